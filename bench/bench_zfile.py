"""ZFile random reads (lz4 and zstd; 4 KiB and 64 KiB blocks) through the core
vs the codec alone on the same stored blocks.

Data: 64 MiB semi-compressible bytes (pieces of random data and repeats of
earlier pieces of the same 4 KiB block; about 1.6-1.8x with either codec),
written with the project's ZFileWriter (CRC on, as overlaybd-zfile and
commit -z write it) and opened with zfile.open_backing, then mapped as
tcmu_obd.image.layer.open_layer does for every local ZFile layer (unless
TCMU_OBD_MMAP=0: then each read preads the stored block).

Each read is one block, block-aligned, at a random block:
  ZFileBacking.pread(off, bs)   returns a new bytes object (like the codec)
  Stack.read_into(buf, off)     a Stack over the ZFile (one index record per
                                8 MiB), into a preallocated buffer: the path
                                every image read of a ZFile layer takes
Baseline (ratio 1.00): the same blocks already in memory, CRC stripped,
decoded by the Python bindings: lz4.block.decompress(block,
uncompressed_size=bs) / zstandard.ZstdDecompressor().decompress(block).
The core's C codec is not exposed on its own, so the baseline is the Python
binding of the same C library; the core additionally preads the block from
the page cache and checks its CRC32C.  Every timed block is first read
through both paths and compared with the original bytes.
"""
import argparse
import os
import random
import time

import lz4
import lz4.block
import zstandard

from _common import (KiB, MiB, TempDir, best, env_line, fmt, interleaved, ratio, semi_compressible, spread,
                     table, warm)
from tcmu_obd import core
from tcmu_obd.image import layer
from tcmu_obd.format import zfile

SECTORS_PER_REC = 16384  # 8 MiB per index record (MAX_LENGTH is 16383)


def write_zfile(path, data, algo, bs):
    with open(path, "wb") as f:
        w = zfile.ZFileWriter(f, algo, bs, verify=True)
        step = 4 * MiB
        for off in range(0, len(data), step):
            w.write(data[off:off + step])
        w.close()


def stack_over(backing, size):
    recs = []
    sectors = size // 512
    per = SECTORS_PER_REC - 1
    for s in range(0, sectors, per):
        n = min(per, sectors - s)
        recs.append((s, n, s, 0, 0))
    idx = core.Index.from_records(recs)
    idx.build_search()
    return core.Stack([backing], idx)


def loop_codec(dec, blocks, picks):
    t0 = time.perf_counter()
    for i in picks:
        dec(blocks[i])
    return time.perf_counter() - t0


def loop_pread(backing, bs, picks):
    pr = backing.pread
    t0 = time.perf_counter()
    for i in picks:
        pr(i * bs, bs)
    return time.perf_counter() - t0


def loop_stack(stack, bs, picks):
    buf = bytearray(bs)
    rd = stack.read_into
    t0 = time.perf_counter()
    for i in picks:
        rd(buf, i * bs)
    return time.perf_counter() - t0


def codec_versions():
    """Library versions behind the core (system liblz4/libzstd) and behind the
    Python bindings (their bundled copies), which the ratio compares."""
    import ctypes
    import ctypes.util

    def sysver(lib, fn):
        try:
            f = getattr(ctypes.CDLL(ctypes.util.find_library(lib)), fn)
            f.restype = ctypes.c_char_p
            return f().decode()
        except (OSError, AttributeError, TypeError):
            return "?"
    py_lz4 = lz4.library_version_string() if hasattr(lz4, "library_version_string") else "?"
    py_zstd = ".".join(map(str, zstandard.ZSTD_VERSION))
    return (f"codecs: core links liblz4 {sysver('lz4', 'LZ4_versionString')}, libzstd "
            f"{sysver('zstd', 'ZSTD_versionString')}; the Python bindings use lz4 {py_lz4}, zstd {py_zstd}")


def loop_codec_seq(dec, blocks, bs, offs, size):
    """Sequential small reads served by the codec plus a one-block cache
    (decode a block once, slice it for every read inside it)."""
    last, cur = -1, b""
    t0 = time.perf_counter()
    for off in offs:
        blk = off // bs
        if blk != last:
            cur = dec(blocks[blk])
            last = blk
        cur[off - blk * bs:off - blk * bs + size]
    return time.perf_counter() - t0


def loop_stack_at(stack, size, offs):
    buf = bytearray(size)
    rd = stack.read_into
    t0 = time.perf_counter()
    for off in offs:
        rd(buf, off)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--ops4k", type=int, default=20_000, help="reads per trial, 4 KiB blocks")
    ap.add_argument("--ops64k", type=int, default=2_000, help="reads per trial, 64 KiB blocks")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seq-mib", type=int, default=4, help="MiB read sequentially in 4 KiB reads per trial")
    ap.add_argument("--seed", type=int, default=5)
    a = ap.parse_args()
    size = a.size_mib * MiB
    rng = random.Random(a.seed)
    data = semi_compressible(size, seed=a.seed)
    rows = []
    seq_rows = []
    notes = []
    with TempDir("zfile") as tmp:
        for algo_name in ("lz4", "zstd"):
            algo = zfile.ALGOS[algo_name]
            for bs in (4 * KiB, 64 * KiB):
                path = os.path.join(tmp, f"data.{algo_name}.{bs // KiB}k.zfile")
                write_zfile(path, data, algo, bs)
                warm(path)
                fd = os.open(path, os.O_RDONLY)
                try:
                    backing, info = zfile.open_backing(fd, 0, os.fstat(fd).st_size, path)
                    if layer.MMAP_ZFILE:
                        backing.map_blocks()
                    nblocks = backing.nblocks
                    assert nblocks == size // bs
                    blocks = []
                    stored = 0
                    for i in range(nblocks):
                        start, ln = backing.block_extent(i)
                        blocks.append(os.pread(fd, ln - 4, start))   # CRC (last 4 bytes) excluded
                        stored += ln
                    if algo_name == "lz4":
                        def dec(b, _d=lz4.block.decompress, _n=bs):
                            return _d(b, uncompressed_size=_n)
                    else:
                        dec = zstandard.ZstdDecompressor().decompress
                    stack = stack_over(backing, size)
                    nops = a.ops4k if bs == 4 * KiB else a.ops64k
                    picks = [rng.randrange(nblocks) for _ in range(nops)]
                    buf = bytearray(bs)
                    for i in picks:
                        want = data[i * bs:(i + 1) * bs]
                        stack.read_into(buf, i * bs)
                        if dec(blocks[i]) != want or backing.pread(i * bs, bs) != want or buf != want:
                            raise SystemExit(f"bench_zfile: block {i} of {path} reads wrong")
                    cases = [
                        ("codec alone (Python binding)", lambda: loop_codec(dec, blocks, picks)),
                        ("ZFileBacking.pread", lambda: loop_pread(backing, bs, picks)),
                        ("Stack.read_into", lambda: loop_stack(stack, bs, picks)),
                    ]
                    t = interleaved(cases, a.rounds)
                    base = t[cases[0][0]]
                    for name, _ in cases:
                        tb = best(t[name])
                        r_best, r_med = ratio(base, t[name])
                        is_base = name.startswith("codec")
                        goal = "" if is_base else (">= 0.85 " + ("ok" if r_best >= 0.85 else "MISS"))
                        rows.append([name, algo_name, f"{bs // KiB} KiB", fmt(nops * bs / tb / 1e6),
                                     fmt(nops / tb / 1e3), f"{tb / nops * 1e6:.2f}",
                                     "1.00 (base)" if is_base else f"{r_best:.2f}",
                                     "" if is_base else f"{r_med:.2f}", f"{spread(t[name]):.0f}%", goal])
                    if bs == 64 * KiB:
                        # sequential 4 KiB reads inside 64 KiB blocks: 16 reads per block
                        start = rng.randrange(0, nblocks - a.seq_mib * MiB // bs) * bs
                        soffs = list(range(start, start + a.seq_mib * MiB, 4 * KiB))
                        for off in soffs[:64]:
                            stack.read_into(buf4 := bytearray(4 * KiB), off)
                            if buf4 != data[off:off + 4 * KiB]:
                                raise SystemExit(f"bench_zfile: sequential read at {off} of {path} reads wrong")
                        scases = [
                            ("seq 4K reads: codec + 1-block cache", lambda: loop_codec_seq(dec, blocks, bs, soffs, 4 * KiB)),
                            ("seq 4K reads: Stack.read_into", lambda: loop_stack_at(stack, 4 * KiB, soffs)),
                        ]
                        st = interleaved(scases, a.rounds)
                        sbase = st[scases[0][0]]
                        for name, _ in scases:
                            tb = best(st[name])
                            r_best, r_med = ratio(sbase, st[name])
                            is_base = "codec" in name
                            seq_rows.append([name, algo_name, f"{bs // KiB} KiB", fmt(len(soffs) * 4 * KiB / tb / 1e6),
                                             fmt(len(soffs) / tb / 1e3), f"{tb / len(soffs) * 1e6:.2f}",
                                             "1.00 (base)" if is_base else f"{r_best:.2f}",
                                             "" if is_base else f"{r_med:.2f}", f"{spread(st[name]):.0f}%"])
                    notes.append(f"{algo_name} {bs // KiB} KiB: {nblocks} blocks, compression "
                                 f"{size / stored:.2f}x (stored blocks incl. CRC)")
                finally:
                    os.close(fd)
                    os.unlink(path)
    table("bench_zfile: random one-block reads of a ZFile vs the codec alone",
          ["case", "algo", "block", "MB/s", "kops/s", "us/op", "ratio", "ratio med", "spread", "goal"], rows,
          ["baseline = Python lz4.block / zstandard decompress of the same stored blocks held in memory, "
           "CRC excluded (the core's C codec is not exposed separately); the core also preads each "
           "block from the page cache and checks its CRC32C",
           "MB/s counts decompressed bytes; one Python call per read; "
           f"best of {a.rounds} interleaved rounds, ratio = best codec time / best case time, "
           "ratio med = median of per-round ratios",
           "every timed block was read through both core paths and the codec and compared with the "
           "original data",
           *notes, codec_versions(), env_line()])
    table("bench_zfile: sequential 4 KiB reads inside 64 KiB blocks (16 reads per block)",
          ["case", "algo", "block", "MB/s", "kops/s", "us/op", "ratio", "ratio med", "spread"], seq_rows,
          [f"{a.seq_mib} MiB read front to back in 4 KiB reads at a random block-aligned start",
           "baseline = the Python codec decoding each 64 KiB block once and slicing it for the 16 reads "
           "inside it (what a one-block decoded cache gives); the core decodes the whole block per read",
           "overlaybd-style serving through TCMU/FUSE issues exactly these small sequential reads"])


if __name__ == "__main__":
    main()
