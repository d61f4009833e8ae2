"""Random 4 KiB and 128 KiB reads through a 10-layer stack vs os.pread of the
same bytes from one flat file.

Setup (all through the project's API): 10 RW layers on a 1 GiB virtual disk,
each written with random 64 KiB..1 MiB extents (the bottom layer, like a
base image, 80% of the disk; each of the 9 upper layers 3.5% of it, at random
places), each committed (uncompressed LSMT, commit.layer_info + compact via
image.output.Output, as overlaybd-commit does) and reopened with open_layer;
Image(layers) merges them.  The flat file is the image exported through
Image.read_into, checked byte for byte against an in-memory model of the
writes.  All files are read once (page cache warm) and fsynced before timing.

Timed: one Python call per read into a preallocated bytearray
(Stack.read_into, Image.read_into), against os.pread(fd, n, off) on the flat
file (the baseline, ratio 1.00) and os.preadv into a preallocated buffer.
Every timed offset list is first read both ways and compared.
"""
import argparse
import os
import random
import threading
import time

from _common import (KiB, MiB, TempDir, best, commit_rw, env_line, fmt, fsync_path, interleaved, ratio, rm, spread,
                     table, warm)
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer

ALIGN = 4 * KiB


def layer_extents(rng, vsize, li, base_fill, fill):
    """(offset, length) of the writes of layer li.  Layer 0 (the base image)
    writes a random `base_fill` share of a partition of the disk into random
    64 KiB..1 MiB extents, in random order; every other layer writes random,
    possibly overlapping, 64 KiB..1 MiB extents totalling `fill` of the disk."""
    out = []
    if li == 0:
        pos = 0
        while pos < vsize:
            ln = min(rng.randrange(64 * KiB, MiB + 1, ALIGN), vsize - pos)
            if rng.random() < base_fill:
                out.append((pos, ln))
            pos += ln
        rng.shuffle(out)
        return out
    written = 0
    while written < vsize * fill:
        ln = rng.randrange(64 * KiB, MiB + 1, ALIGN)
        out.append((rng.randrange(0, vsize - ln + 1, ALIGN), ln))
        written += ln
    return out


def build(tmp, vsize, nlayers, base_fill, fill, rng):
    """Write, commit and open the layers; returns (layers, model, writes)."""
    model = bytearray(vsize)
    pool = memoryview(rng.randbytes(64 * MiB))
    layers = []
    nwrites = 0
    for li in range(nlayers):
        dpath, ipath = os.path.join(tmp, f"rw{li}.data"), os.path.join(tmp, f"rw{li}.index")
        rw = RWLayer.create(dpath, ipath, vsize)
        try:
            for off, ln in layer_extents(rng, vsize, li, base_fill, fill):
                src = rng.randrange(0, len(pool) - ln, 512)
                piece = pool[src:src + ln]
                rw.write(piece, off)
                model[off:off + ln] = piece
                nwrites += 1
            out = os.path.join(tmp, f"layer{li}.lsmt")
            commit_rw(rw, out)
        finally:
            rw.close()
            rm(dpath, ipath)
        layers.append(open_layer(out))
    return layers, model, nwrites


def export_flat(img, model, path, vsize):
    """Read the whole image through Image.read_into, check it against the
    model and write it to `path`."""
    chunk = 4 * MiB
    buf = bytearray(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, vsize, chunk):
            img.read_into(buf, off)
            if bytes(buf) != model[off:off + chunk]:
                raise SystemExit(f"bench_read: image bytes at {off} differ from the model of the writes")
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(stack, fd, size, offsets):
    buf = bytearray(size)
    for off in offsets:
        stack.read_into(buf, off)
        if buf != os.pread(fd, size, off):
            raise SystemExit(f"bench_read: Stack.read_into({size}, {off}) differs from the flat file")


# ------------------------------------------------------------------ loops
def loop_pread(fd, size, offs):
    pr = os.pread
    t0 = time.perf_counter()
    for off in offs:
        pr(fd, size, off)
    return time.perf_counter() - t0


def loop_preadv(fd, size, offs):
    bufs = [bytearray(size)]
    pv = os.preadv
    t0 = time.perf_counter()
    for off in offs:
        pv(fd, bufs, off)
    return time.perf_counter() - t0


def loop_into(read_into, size, offs):
    buf = bytearray(size)
    t0 = time.perf_counter()
    for off in offs:
        read_into(buf, off)
    return time.perf_counter() - t0


def threaded(loop, args, parts):
    """Run loop(*args, part) in one thread per part, started together;
    returns the wall time from the common start to the last finish."""
    start = threading.Barrier(len(parts) + 1)

    def body(part):
        start.wait()
        loop(*args, part)

    ts = [threading.Thread(target=body, args=(p,)) for p in parts]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def gil_probe(stack, length):
    """One Stack.read_into of `length` bytes in a thread while the main
    thread holds the GIL in one long C call.  Returns (read alone s, hold s,
    reader CPU s during the hold, reader CPU s for the whole read): a read
    path that never takes the GIL runs to the end during the hold."""
    buf = bytearray(length)
    stack.read_into(buf, 0)                  # fault the buffer in
    t0 = time.perf_counter()
    stack.read_into(buf, 0)
    alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    sum(range(1_000_000))
    per_m = time.perf_counter() - t0
    hold_n = int(max(0.25, 8 * alone) / per_m * 1_000_000)
    info = {}
    started, release = threading.Event(), threading.Event()

    def cpu():
        return time.clock_gettime(time.pthread_getcpuclockid(info["tid"]))

    def reader():
        info["tid"] = threading.get_ident()
        info["c0"] = cpu()
        started.set()
        stack.read_into(buf, 0)
        info["c_end"] = cpu()
        release.wait()

    th = threading.Thread(target=reader)
    th.start()
    started.wait()
    t0 = time.perf_counter()
    sum(range(hold_n))                        # holds the GIL throughout
    hold = time.perf_counter() - t0
    c_hold = cpu()
    while "c_end" not in info:
        time.sleep(0.001)
    release.set()
    th.join()
    return alone, hold, c_hold - info["c0"], info["c_end"] - info["c0"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vsize-mib", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--base-fill", type=float, default=0.8, help="share of the disk the bottom layer writes")
    ap.add_argument("--fill", type=float, default=0.035, help="share of the disk each upper layer writes")
    ap.add_argument("--ops4k", type=int, default=30_000, help="reads per trial")
    ap.add_argument("--ops128k", type=int, default=6_000, help="reads per trial")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    vsize = a.vsize_mib * MiB
    rng = random.Random(a.seed)

    with TempDir("read") as tmp:
        t0 = time.perf_counter()
        layers, model, nwrites = build(tmp, vsize, a.layers, a.base_fill, a.fill, rng)
        img = Image(layers)
        try:
            flat = os.path.join(tmp, "flat.img")
            export_flat(img, model, flat, vsize)
            del model
            for layer in layers:
                fsync_path(layer.path)
                warm(layer.path)
            warm(flat)
            setup_s = time.perf_counter() - t0
            stack = img.stack
            nrec = len(img.lower_index)
            covered = sum(r[1] for r in img.lower_index.records()) * 512 / vsize
            fd = os.open(flat, os.O_RDONLY)
            try:
                rows = []
                notes = []
                for size, nops in ((4 * KiB, a.ops4k), (128 * KiB, a.ops128k)):
                    offs = [rng.randrange(0, vsize - size + 1, ALIGN) for _ in range(nops)]
                    verify(stack, fd, size, offs)
                    verify(img, fd, size, offs[:1000])
                    recs = sum(len(stack.lookup(o // 512, size // 512)) for o in offs[:2000]) / 2000
                    halves = [offs[0::2], offs[1::2]]
                    cases = [
                        ("os.pread flat file", lambda: loop_pread(fd, size, offs)),
                        ("os.preadv flat file, prealloc buf", lambda: loop_preadv(fd, size, offs)),
                        ("Stack.read_into", lambda: loop_into(stack.read_into, size, offs)),
                        ("Image.read_into", lambda: loop_into(img.read_into, size, offs)),
                        ("os.pread flat file x2thr", lambda: threaded(loop_pread, (fd, size), halves)),
                        ("Stack.read_into x2thr", lambda: threaded(loop_into, (stack.read_into, size), halves)),
                    ]
                    t = interleaved(cases, a.rounds)
                    goal = {4 * KiB: 0.6, 128 * KiB: 0.9}[size]
                    for name, _ in cases:
                        thr = 2 if "x2thr" in name else 1
                        base = t["os.pread flat file x2thr" if thr == 2 else "os.pread flat file"]
                        tb = best(t[name])
                        r_best, r_med = ratio(base, t[name])
                        is_base = name.startswith("os.pread flat")
                        g = ""
                        if "read_into" in name and thr == 1:
                            g = f">= {goal}" + (" ok" if r_best >= goal else " MISS")
                        rows.append([name.replace(" x2thr", ""), f"{size // KiB} KiB", str(thr),
                                     fmt(nops * size / tb / 1e6), fmt(nops / tb / 1e3),
                                     f"{tb / nops * 1e6:.2f}", "1.00 (base)" if is_base else f"{r_best:.2f}",
                                     "" if is_base else f"{r_med:.2f}", f"{spread(t[name]):.0f}%", g])
                    scale = {n: best(t[n]) / best(t[n + " x2thr"]) for n in ("os.pread flat file", "Stack.read_into")}
                    notes.append(f"{size // KiB} KiB reads touch {recs:.2f} merged records on average")
                    notes.append(f"{size // KiB} KiB 2-thread scaling: os.pread "
                                 f"{scale['os.pread flat file']:.2f}x, "
                                 f"Stack.read_into {scale['Stack.read_into']:.2f}x "
                                 f"(vs 1 thread, same op count)")
                table("bench_read: random reads, 10-layer LSMT stack vs flat file (page cache warm)",
                      ["case", "size", "thr", "MB/s", "kops/s", "us/op", "ratio", "ratio med", "spread", "goal"], rows,
                      [f"{a.layers} committed layers, {nwrites} random 64K-1M writes over a "
                       f"{a.vsize_mib} MiB disk (bottom layer {a.base_fill:.0%} of it, each upper layer "
                       f"{a.fill:.1%}); merged index: {nrec} records, covering {covered:.0%} of the disk (the rest are holes)",
                       "ratio = best os.pread time / best case time over "
                       f"{a.rounds} interleaved rounds (same offsets, same thread count; 2-thread rows vs "
                       "os.pread with 2 threads); ratio med = median of the per-round ratios; "
                       "MB/s, kops/s, us/op from the best round; spread = (max-min)/min",
                       "offsets 4 KiB-aligned, uniform over the disk; 2 threads split the same offsets",
                       "every timed offset was read once through Stack.read_into and compared with the "
                       "flat file; the flat file was checked against a model of the writes",
                       *notes,
                       f"setup {setup_s:.1f}s; {env_line()}"])
                probe_len = min(256 * MiB, vsize)
                alone, hold, c_hold, c_all = gil_probe(stack, probe_len)
                table("bench_read: GIL independence of Stack.read_into",
                      ["case", "ms", "reader CPU during hold, ms", "finished during the hold"],
                      [[f"Stack.read_into of {probe_len // MiB} MiB alone", f"{alone * 1e3:.1f}", "", ""],
                       ["same read while the main thread holds the GIL", f"{hold * 1e3:.0f} (hold)",
                        f"{c_hold * 1e3:.1f} of {c_all * 1e3:.1f}",
                        "yes" if c_hold >= 0.9 * c_all else "NO: the read waits for the GIL"]],
                      ["the main thread holds the GIL in one C call (sum(range(n))) while a thread runs one "
                       "read_into across ~" f"{len(stack.lookup(0, probe_len // 512))} records; the reader's "
                       "thread CPU clock shows how much of the read ran during the hold",
                       "a read path that re-acquires the GIL inside its nogil section (e.g. Cython's error "
                       "check after a nogil helper without `noexcept`) stalls at its first helper call"])
            finally:
                os.close(fd)
        finally:
            img.close()


if __name__ == "__main__":
    main()
