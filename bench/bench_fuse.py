"""O_DIRECT reads from a loop device over the FUSE file of `tcmu-obd mount
--loop` (loop direct I/O on: every read reaches the daemon) vs a loop device
over a raw file holding the same bytes.

Setup (project API): one committed LSMT layer (uncompressed, as
overlaybd-commit writes it) with a data-bearing region of --region-mib MiB
at the start of a --vsize-mib MiB disk, written in shuffled 1 MiB extents;
config.v1.json with that layer as its only lower, mounted with the CLI
(`python -m tcmu_obd.cli.mount mount CONFIG DIR --loop`).  The raw file is
the image exported through Image.read_into (sparse outside the region).
Both files are fsynced and read once (page cache warm).

Timed: sequential 1 MiB and random 4 KiB (4 KiB-aligned, inside the region)
os.preadv reads into a page-aligned mmap buffer, on fds opened O_DIRECT:
  - loop on the raw file, direct-io off (reads come from the raw file's page
    cache): the baseline, ratio 1.00;
  - loop on the raw file, direct-io on (reads go to the disk under /tmp);
  - loop on the FUSE file, direct-io on (the `mount --loop` path);
  - the FUSE file itself, no loop.
Every path is first checked against Image.pread at sample offsets.  Needs
root, /dev/fuse, losetup, fusermount3 and mfusepy; skips (exit 0) without.
"""
import argparse
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import threading
import time

from _common import (KiB, MiB, ROOT, TempDir, best, commit_rw, env_line, export_raw, fmt, fsync_path, interleaved,
                     ratio, spread, table, warm)
from tcmu_obd.serve import fuse
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer

CLI = [sys.executable, "-m", "tcmu_obd.cli.mount"]


def missing():
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in ("losetup", "fusermount3"):
        if not shutil.which(tool):
            return f"no {tool}"
    try:
        fuse.binding()
    except Exception as e:      # noqa: BLE001
        return str(e)
    return None


def build(tmp, vsize, region, rng):
    """A committed layer with random data in [0, region); returns its path."""
    dpath, ipath = os.path.join(tmp, "rw.data"), os.path.join(tmp, "rw.index")
    rw = RWLayer.create(dpath, ipath, vsize)
    try:
        pool = memoryview(rng.randbytes(16 * MiB))
        offs = list(range(0, region, MiB))
        rng.shuffle(offs)
        for off in offs:
            s = rng.randrange(0, len(pool) - MiB, 4096)
            rw.write(pool[s:s + MiB], off)
        out = os.path.join(tmp, "layer.lsmt")
        commit_rw(rw, out)
    finally:
        rw.close()
        os.unlink(dpath)
        os.unlink(ipath)
    return out


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"bench_fuse: {' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout.strip()


def seq_reads(fd, buf, region, bs):
    pv = os.preadv
    bufs = [memoryview(buf)[:bs]]
    t0 = time.perf_counter()
    for off in range(0, region, bs):
        pv(fd, bufs, off)
    return time.perf_counter() - t0


def rand_reads(fd, buf, offs, bs=4 * KiB):
    pv = os.preadv
    bufs = [memoryview(buf)[:bs]]
    t0 = time.perf_counter()
    for off in offs:
        pv(fd, bufs, off)
    return time.perf_counter() - t0


def threaded_rand(fd, offs, nthr):
    """nthr threads, each with its own buffer, splitting offs; wall time."""
    parts = [offs[i::nthr] for i in range(nthr)]
    bufs = [mmap.mmap(-1, 4 * KiB) for _ in parts]
    start = threading.Barrier(nthr + 1)

    def body(i):
        start.wait()
        rand_reads(fd, bufs[i], parts[i])

    ts = [threading.Thread(target=body, args=(i,)) for i in range(nthr)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def check(fd, img, buf, region, rng, what):
    for _ in range(64):
        n = rng.choice([4 * KiB, 64 * KiB, MiB])
        off = rng.randrange(0, region - n + 1, 4 * KiB)
        got = os.preadv(fd, [memoryview(buf)[:n]], off)
        if got != n or buf[:n] != img.pread(off, n):
            raise SystemExit(f"bench_fuse: {what}: {n} bytes at {off} differ from Image.pread")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vsize-mib", type=int, default=1024)
    ap.add_argument("--region-mib", type=int, default=256, help="data-bearing region read by the trials")
    ap.add_argument("--ops4k", type=int, default=3000, help="random 4 KiB reads per trial")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    why = missing()
    if why:
        print(f"bench_fuse: skipped ({why})")
        return 0
    vsize, region = a.vsize_mib * MiB, a.region_mib * MiB
    rng = random.Random(a.seed)
    with TempDir("fuse") as tmp:
        t0 = time.perf_counter()
        layer_path = build(tmp, vsize, region, rng)
        img = Image([open_layer(layer_path)])
        raw = os.path.join(tmp, "raw.img")
        export_raw(img, raw, vsize, region)
        fsync_path(layer_path)
        warm(layer_path)
        warm(raw)
        cfg = os.path.join(tmp, "config.v1.json")
        with open(cfg, "w") as f:
            json.dump({"lowers": [{"file": layer_path}]}, f)
        mnt = os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        loops, fds = [], []
        mounted = False
        try:
            raw_loop = run(["losetup", "-f", "--show", "-r", "--direct-io=off", raw])
            loops.append(raw_loop)
            raw_dio = run(["losetup", "-f", "--show", "-r", "--direct-io=on", raw])
            loops.append(raw_dio)
            fuse_loop = run(CLI + ["mount", cfg, mnt, "--loop"])
            mounted = True
            setup_s = time.perf_counter() - t0
            paths = [("loop on raw file (page cache)", raw_loop),
                     ("loop dio on raw file", raw_dio),
                     ("loop dio on FUSE file", fuse_loop),
                     ("FUSE file, no loop", os.path.join(mnt, fuse.FILE_NAME))]
            dio = {name: fuse.loop_dio(dev) for name, dev in paths[:3]}
            buf = mmap.mmap(-1, MiB)
            fd_of = {}
            for name, path in paths:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                fds.append(fd)
                fd_of[name] = fd
                check(fd, img, buf, region, rng, name)
            base_name = paths[0][0]
            offs = [rng.randrange(0, region, 4 * KiB) for _ in range(a.ops4k)]
            rows = []
            ops = [("seq 1 MiB", 1, region // MiB, MiB, lambda fd: seq_reads(fd, buf, region, MiB)),
                   ("rand 4 KiB", 1, a.ops4k, 4 * KiB, lambda fd: rand_reads(fd, buf, offs)),
                   ("rand 4 KiB", 2, a.ops4k, 4 * KiB, lambda fd: threaded_rand(fd, offs, 2))]
            # The FUSE path copies twice (page cache -> daemon buffer -> the loop's pages) and adds a
            # round trip; the baseline copies once: seq >= 0.2, 4 KiB (round-trip bound) >= 0.25.
            goals = {("seq 1 MiB", 1): 0.2, ("rand 4 KiB", 1): 0.25}
            for op, thr, nops, size, fn in ops:
                cases = [(name, (lambda fd: lambda: fn(fd))(fd_of[name])) for name, _ in paths]
                t = interleaved(cases, a.rounds)
                for name, _ in cases:
                    tb = best(t[name])
                    is_base = name == base_name
                    r_best, r_med = ratio(t[base_name], t[name])
                    g = ""
                    if name == "loop dio on FUSE file" and (op, thr) in goals:
                        goal = goals[(op, thr)]
                        g = f">= {goal}" + (" ok" if r_best >= goal else " MISS")
                    rows.append([name, op, str(thr), fmt(nops * size / tb / 1e6), f"{tb / nops * 1e6:.1f}",
                                 "1.00 (base)" if is_base else f"{r_best:.2f}", "" if is_base else f"{r_med:.2f}",
                                 f"{spread(t[name]):.0f}%", g])
            table("bench_fuse: O_DIRECT reads, FUSE + loop (`tcmu-obd mount --loop`) vs loop on a raw file",
                  ["path", "op", "thr", "MB/s", "us/op", "ratio", "ratio med", "spread", "goal"], rows,
                  [f"one committed layer, {a.region_mib} MiB of data in shuffled 1 MiB extents at the start "
                   f"of a {a.vsize_mib} MiB disk; raw file = the image exported (same bytes); page cache warm",
                   f"seq: the whole region in 1 MiB reads; rand: {a.ops4k} reads at 4 KiB-aligned offsets in "
                   f"the region (2 threads split them); os.preadv into an mmap buffer, fds opened O_DIRECT",
                   "ratio = best baseline time / best case time over "
                   f"{a.rounds} interleaved rounds; ratio med = median of per-round ratios; spread = (max-min)/min",
                   f"loop direct I/O (sysfs dio): {', '.join(f'{k}: {v}' for k, v in dio.items())}; "
                   f"FUSE: mfusepy over libfuse3, multithreaded, max_read 1 MiB",
                   "every path was checked against Image.pread at 64 sample offsets before timing",
                   f"setup {setup_s:.1f}s; {env_line()}"])
        finally:
            for fd in fds:
                os.close(fd)
            if mounted or fuse.is_mounted(mnt):
                subprocess.run(CLI + ["umount", mnt], cwd=ROOT)
            for dev in loops:
                subprocess.run(["losetup", "-d", dev])
            img.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
