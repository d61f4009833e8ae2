"""Commit throughput (RW layer -> committed file, plain and -z) and ZFile
compression throughput with 1 and 2 threads, against a plain file copy of
the same bytes.

Data: 128 MiB semi-compressible bytes (about 1.7x with lz4 or zstd) written
to an append-only RW layer in 1 MiB writes at shuffled offsets, so the commit
walks the index in disk order and reads the data file out of order.

  plain copy (baseline)      the RW data file's 128 MiB read in 4 MiB preads and
                             written through a 1 MiB-buffered file, fsync at the end
  commit                     commit.layer_info + commit.compact into image.output.Output,
                             exactly what overlaybd-commit does (fsync at close)
  commit -z lz4, threads=N   the same with a ZFile (4 KiB blocks, CRC on) and
                             --compress_threads N
  ZFileWriter algo threads=N the in-memory bytes written to a ZFileWriter over a
                             1 MiB-buffered file in 4 MiB writes, then closed and fsynced

MB/s counts the uncompressed bytes.  All outputs go to the same file system;
each is deleted after its trial; the source stays in the page cache.  Every
output is checked once (committed layers read back through open_layer +
Image and compared; ZFiles decoded through the core and compared).
"""
import argparse
import os
import random
import time

from _common import (MiB, TempDir, best, commit_rw, env_line, fmt, interleaved, ratio, rm,
                     semi_compressible, spread, table, warm)
from tcmu_obd.format import zfile
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer

CHUNK = 4 * MiB


def settle(out_path):
    """Untimed: delete a trial's output and let the file system finish with
    it (ext4 here is mounted with online discard: freeing 100+ MiB issues
    discards that would otherwise land in the next trial's fsync)."""
    rm(out_path)
    os.sync()


def plain_copy(src_fd, nbytes, src_off, out_path):
    t0 = time.perf_counter()
    with open(out_path, "wb", buffering=MiB) as f:
        pos = 0
        while pos < nbytes:
            data = os.pread(src_fd, min(CHUNK, nbytes - pos), src_off + pos)
            f.write(data)
            pos += len(data)
        f.flush()
        os.fsync(f.fileno())
    el = time.perf_counter() - t0
    settle(out_path)
    return el


def do_commit(rw, out_path, use_zfile, algo, threads):
    t0 = time.perf_counter()
    commit_rw(rw, out_path, use_zfile=use_zfile, algo=algo, threads=threads)
    el = time.perf_counter() - t0
    settle(out_path)
    return el


def zfile_write(data, out_path, algo, threads):
    view = memoryview(data)
    t0 = time.perf_counter()
    with open(out_path, "wb", buffering=MiB) as f:
        w = zfile.ZFileWriter(f, algo, 4096, verify=True, threads=threads)
        for off in range(0, len(data), CHUNK):
            w.write(view[off:off + CHUNK])
        w.close()
        f.flush()
        os.fsync(f.fileno())
    el = time.perf_counter() - t0
    settle(out_path)
    return el


def check_commit(rw, path, model, size, use_zfile, algo):
    commit_rw(rw, path, use_zfile=use_zfile, algo=algo)
    layer = open_layer(path)
    try:
        if use_zfile and "zfile" not in layer.wrappers:
            raise SystemExit("bench_commit: commit -z did not produce a ZFile")
        img = Image([layer])
        got = img.read(0, size)
        if got != model:
            raise SystemExit(f"bench_commit: committed layer {path} reads differently from what was written")
        out_size = os.path.getsize(path)
    finally:
        layer.close()
        rm(path)
    return out_size


def check_zfile(data, path, algo):
    with open(path, "wb") as f:
        w = zfile.ZFileWriter(f, algo, 4096, verify=True, threads=2)
        w.write(data)
        w.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        backing, _ = zfile.open_backing(fd, 0, os.fstat(fd).st_size, path)
        backing.verify_all()
        if backing.pread(0, len(data)) != data:
            raise SystemExit(f"bench_commit: ZFile {path} decodes differently from its input")
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
        rm(path)
    return size


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    size = a.size_mib * MiB
    rng = random.Random(a.seed)
    data = bytes(semi_compressible(size, seed=a.seed))
    lz4, zstd = zfile.ALGO_LZ4, zfile.ALGO_ZSTD
    with TempDir("commit") as tmp:
        dpath, ipath = os.path.join(tmp, "rw.data"), os.path.join(tmp, "rw.index")
        rw = RWLayer.create(dpath, ipath, 2 * size)
        try:
            offs = list(range(0, size, MiB))
            rng.shuffle(offs)
            view = memoryview(data)
            for off in offs:
                rw.write(view[off:off + MiB], off)
            rw.fsync()
            warm(dpath)
            out = os.path.join(tmp, "out")
            sizes = {
                "commit": check_commit(rw, out, data, size, False, lz4),
                "commit -z lz4": check_commit(rw, out, data, size, True, lz4),
                "ZFileWriter lz4": check_zfile(data, out, lz4),
                "ZFileWriter zstd": check_zfile(data, out, zstd),
            }
            src_fd = rw.data_fd
            data_start = 4096   # an RW data file: 4 KiB header, then the data in write order
            cases = [
                ("plain copy", lambda: plain_copy(src_fd, size, data_start, out)),
                ("commit", lambda: do_commit(rw, out, False, lz4, 1)),
                ("commit -z lz4, threads=1", lambda: do_commit(rw, out, True, lz4, 1)),
                ("commit -z lz4, threads=2", lambda: do_commit(rw, out, True, lz4, 2)),
                ("ZFileWriter lz4, threads=1", lambda: zfile_write(data, out, lz4, 1)),
                ("ZFileWriter lz4, threads=2", lambda: zfile_write(data, out, lz4, 2)),
                ("ZFileWriter zstd, threads=1", lambda: zfile_write(data, out, zstd, 1)),
                ("ZFileWriter zstd, threads=2", lambda: zfile_write(data, out, zstd, 2)),
            ]
            settle(out)
            # each trial runs twice back to back and the second run is timed: on this VM the first
            # trial to write fresh page-cache pages after another case ran is often 2-4x slower
            # (memory the host reclaimed), which otherwise lands on whichever case comes first
            t = interleaved([(name, lambda fn=fn: (fn(), fn())[1]) for name, fn in cases], a.rounds)
        finally:
            rw.close()
    base = t["plain copy"]
    rows = []
    for name, _ in cases:
        tb = best(t[name])
        r_best, r_med = ratio(base, t[name])
        key = name.split(",")[0]
        out_sz = sizes.get(key)
        one = name.replace("threads=2", "threads=1")
        speedup = f"{best(t[one]) / tb:.2f}x" if "threads=2" in name else ""
        rows.append([name, fmt(size / tb / 1e6), f"{tb:.3f}",
                     "1.00 (base)" if name == "plain copy" else f"{r_best:.2f}",
                     "" if name == "plain copy" else f"{r_med:.2f}", speedup,
                     f"{size / out_sz:.2f}x" if out_sz else "", f"{spread(t[name]):.0f}%"])
    table("bench_commit: commit and ZFile compression throughput vs a plain copy",
          ["case", "MB/s", "s", "ratio", "ratio med", "2thr/1thr", "compr.", "spread"], rows,
          [f"{a.size_mib} MiB of semi-compressible data (4 KiB ZFile blocks, CRC on); MB/s = uncompressed "
           f"bytes / best of {a.rounds} interleaved rounds (each the 2nd of two back-to-back runs), "
           "fsync included everywhere",
           "ratio = best plain-copy time / best case time (1.00 = as fast as copying the bytes); "
           "ratio med = median of per-round ratios",
           "compr. = input size / output size (checked outputs: committed layers read back through "
           "Image, ZFiles decoded through the core)",
           env_line()])


if __name__ == "__main__":
    main()
