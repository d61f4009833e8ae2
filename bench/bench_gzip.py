"""Reads of a gzip blob's decompressed stream through GzipBacking (the core,
over a RawBacking of the .gz and its ddgzidx index) vs zlib alone.

Data: 64 MiB semi-compressible bytes (bench._common.semi_compressible),
gzipped at level 6 by Python's gzip module, indexed with build_index (span
1 MiB, as overlaybd's tools use).  The .gz is in the page cache.

  sequential   GzipBacking.pread of the whole stream in 1 MiB reads, from a
               fresh backing (nothing cached)
               baseline: zlib.decompressobj(31).decompress of the whole .gz
               (in memory), the same bytes out
  random 4K    4 KiB reads at random offsets through a fresh backing each
               round (a few hit pieces decoded by earlier reads)
               baseline: for each read, zlib alone inflating as many bytes
               as a read from its access point needs (offset - de_pos +
               4096), from the stream's start (Python's zlib cannot start at
               an access point whose first bits share a byte), so the same
               amount of inflate work per read

Ratios are baseline time / GzipBacking time: above 1 = faster than zlib
alone.  Every read is first checked against the original bytes.
"""
import argparse
import gzip
import io
import os
import random
import zlib

from _common import MiB, TempDir, env_line, fmt, interleaved, ratio, semi_compressible, table
from tcmu_obd import core
from tcmu_obd.format import gzindex


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="MiB of data (default 64)")
    ap.add_argument("--reads", type=int, default=300, help="random 4 KiB reads per round")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    size = a.size * MiB
    data = bytes(semi_compressible(size))
    gz = gzip.compress(data, 6, mtime=0)
    rng = random.Random(7)
    with TempDir("gzip") as tmp:
        gzp = os.path.join(tmp, "blob.gz")
        with open(gzp, "wb") as f:
            f.write(gz)
        idx = gzindex.build_index(io.BytesIO(gz), os.path.join(tmp, "blob.gzidx"))
        des = [e.de_pos for e in idx.entries]
        fd = os.open(gzp, os.O_RDONLY)
        target = core.RawBacking(fd, 0, len(gz), "blob.gz")
        picks = [rng.randrange(0, size - 4096) for _ in range(a.reads)]
        import bisect
        work = [p + 4096 - des[bisect.bisect_right(des, p) - 1] for p in picks]

        def fresh():
            return gzindex.open_backing(target, idx, "blob.gz[gzip]")

        g = fresh()
        assert g.pread(0, size) == data
        for p in picks[:50]:
            assert g.pread(p, 4096) == data[p:p + 4096]

        def seq_zlib():
            zlib.decompressobj(31).decompress(gz)

        def seq_gzip():
            b = fresh()
            for off in range(0, size, MiB):
                b.pread(off, MiB)

        mv = memoryview(gz)

        def rnd_zlib():
            for n in work:      # input cut near n: the unconsumed tail is copied
                zlib.decompressobj(31).decompress(mv[:n + 65536], n)

        def rnd_gzip():
            b = fresh()
            for p in picks:
                b.pread(p, 4096)

        t = interleaved([("seq zlib", seq_zlib), ("seq gzip", seq_gzip),
                         ("rnd zlib", rnd_zlib), ("rnd gzip", rnd_gzip)], a.rounds)
        os.close(fd)
    rows = []
    for name, base, case, unit in (("sequential 1 MiB reads", "seq zlib", "seq gzip", size),
                                   ("random 4 KiB reads", "rnd zlib", "rnd gzip", a.reads)):
        r_best, r_med = ratio(t[base], t[case])
        per = (f"{size / min(t[case]) / MiB:.0f} MiB/s" if unit == size
               else f"{min(t[case]) / a.reads * 1e6:.0f} us/read")
        base_per = (f"{size / min(t[base]) / MiB:.0f} MiB/s" if unit == size
                    else f"{min(t[base]) / a.reads * 1e6:.0f} us/read")
        rows.append([name, base_per, per, fmt(r_best, 2), fmt(r_med, 2)])
    table(f"gzip reads, {a.size} MiB ({len(gz) / size:.2f} of it gzipped, {len(des)} access points), "
          f"{a.rounds} rounds", ["case", "zlib alone", "GzipBacking", "ratio best", "ratio median"], rows,
          notes=[env_line(), f"random reads: {a.reads} per round; zlib inflates "
                 f"{sum(work) / len(work) / MiB:.2f} MiB per read on average"])


if __name__ == "__main__":
    main()
