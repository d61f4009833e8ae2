"""Reads through a TurboOCI warp layer (tag-1 records reading the original
layer's tar): the target as a plain tar (baseline), as a .tar.gz through its
gzip index (core.GzipBacking: inflate from the access point before each
read, with the decoded-span LRU), and through the gzip cache (the
decompressed stream in a sparse file, warmed by one full pass first).

Setup: a semi-compressible 64 MiB "tar", gzip -6, its gzip index (1 MiB
span, as turboOCI-apply writes it), and a warp meta layer whose tag-1
records map the whole tar onto the disk in 8 MiB records.  Every case reads
the same random offsets; each result is checked against the tar first.
Ratio = plain-tar time / case time (below 1: slower than a plain tar).
Not a benchmark of the registry: all files are local.
"""
import argparse
import gzip
import os
import random
import statistics  # noqa: F401 - ratio() uses it through _common

from _common import MiB, TempDir, env_line, fmt, interleaved, ratio, semi_compressible, spread, table
from tcmu_obd import core
from tcmu_obd.format import gzindex
from tcmu_obd.format.lsmt import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, HT_SPACE, SECTOR, LsmtHeader
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.stack import Image
from tcmu_obd.image import warp
from tcmu_obd.remote.cache import FileCache

REC = 16384 - 1     # sectors per record (LSMT's maximum length)


def write_meta(path, tar_size):
    recs, off = [], 0
    nsect = tar_size // SECTOR
    while off < nsect:
        n = min(REC, nsect - off)
        recs.append((off, n, off, 0, 1))
        off += n
    recs.insert(0, (nsect + 8, 8, HT_SPACE // SECTOR, 0, 0))          # one tag-0 record (4 KiB)
    recs.sort()
    dump = core.Index.from_records(recs).dump(256)
    with open(path, "wb") as f:
        f.write(LsmtHeader(FLAG_HEADER | FLAG_DATA | FLAG_SEALED, 0, 0, 1 << 30).pack())
        f.write(b"m" * 4096)
        f.write(dump)
        f.write(LsmtHeader(FLAG_DATA | FLAG_SEALED, HT_SPACE + 4096, len(dump) // 16, 1 << 30).pack())


def image_with_target(meta, target):
    layer = open_layer(meta, warp=True)
    target.zero_fill_past_end = True
    layer.set_target(target, None)
    return Image([layer])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    size = args.size_mib * MiB
    with TempDir("bench_warp") as tmp:
        tar = semi_compressible(size, seed=args.seed)
        tar_path, gz_path, idx_path, meta = (os.path.join(tmp, n) for n in ("layer.tar", "layer.tar.gz",
                                                                             "gzip.meta", "meta"))
        with open(tar_path, "wb") as f:
            f.write(tar)
        with open(gz_path, "wb") as f:
            f.write(gzip.compress(bytes(tar), 6))
        with open(gz_path, "rb") as f:
            gzindex.build_index(f, idx_path)
        write_meta(meta, size)
        fds = [os.open(p, os.O_RDONLY) for p in (tar_path, gz_path)]
        plain = core.RawBacking(fds[0], 0, size, tar_path)
        gzraw = core.RawBacking(fds[1], 0, os.path.getsize(gz_path), gz_path)
        gzv = gzindex.open_backing(gzraw, idx_path, "gz")
        cache = FileCache(os.path.join(tmp, "gzcache"), 1, 1 << 20)
        blob = cache.open("sha256:" + "0" * 64, size, warp._GzipSource(gzindex.open_backing(gzraw, idx_path, "gz2")))
        cached = core.RawBacking(blob.fd, 0, size, "cache")
        cached.attach(blob.presence, blob)
        images = {"plain tar": image_with_target(meta, plain), "gzip index": image_with_target(meta, gzv),
                  "gzip cache": image_with_target(meta, cached)}
        images["gzip cache"].read(0, size)                    # warm the cache: one full pass
        rows = []
        for n in (4096, 128 * 1024):
            rng = random.Random(args.seed + n)
            offs = [rng.randrange(0, (size - n) // 4096) * 4096 for _ in range(args.reads)]
            buf = bytearray(n)
            for name, img in images.items():           # correctness first
                for off in offs[:20]:
                    img.read_into(buf, off)
                    assert buf == tar[off:off + n], (name, off)

            def run(img):
                def go():
                    for off in offs:
                        img.read_into(buf, off)
                return go
            times = interleaved([(name, run(img)) for name, img in images.items()], args.rounds)
            base = times["plain tar"]
            for name in images:
                t = min(times[name])
                r, rmed = ratio(base, times[name])
                rows.append([f"{n // 1024} KiB random", name, fmt(args.reads / t), fmt(t / args.reads * 1e6),
                             fmt(n * args.reads / t / MiB), f"{r:.3g}", f"{rmed:.3g}", f"{spread(times[name]):.0f}%"])
        table(f"warp layer reads, {args.size_mib} MiB target, {args.reads} reads x {args.rounds} rounds",
              ["read", "target", "reads/s", "us/read", "MB/s", "ratio", "ratio med", "spread"], rows,
              [env_line(), "ratio = plain-tar time / case time; the gzip cache was filled by one full pass"])
        for img in images.values():
            img.stack         # noqa: B018 - kept alive until here
        blob.close()
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    main()
