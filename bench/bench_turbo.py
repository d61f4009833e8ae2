"""TurboOCI conversion vs native overlaybd conversion of the same layer tar.

  native (baseline)   overlaybd-create --mkfs (RW layer) + overlaybd-apply (the
                      tar unpacked into the kernel's ext4 over FUSE + loop) +
                      overlaybd-commit -z: what the convertor does per layer
                      without TurboOCI
  turboOCI            overlaybd-create --turboOCI --mkfs + turboOCI-apply (metadata
                      only; file contents mapped to the tar) + overlaybd-commit
                      -z --turboOCI
  native gzip         native from the tar.gz (overlaybd-apply decompresses it)
  turboOCI gzip       TurboOCI from the tar.gz, building gzip.meta in the same pass

MB/s counts the uncompressed tar bytes over the whole create+apply+commit.
The ratio is native time / case time (above 1: faster than native); goal
>= 3x; for the gzip cases the last column compares with native gzip.  Also the committed layer's size as a fraction of the tar (the
meta blob of TurboOCI; for native the whole layer).  Every trial's output
is deleted after it; the inputs stay in the page cache.

Data: --mib MiB of files (sizes log-uniform 1 KiB..4 MiB, semi-compressible
bytes) in a PAX tar made by tarfile.  Root only (mount, loop, FUSE).
"""
import argparse
import gzip
import io
import json
import os
import random
import statistics

from _common import MiB, TempDir, env_line, fmt, interleaved, ratio, semi_compressible, table, write_tar
from tcmu_obd.build import apply, turbo
from tcmu_obd.cli import commit as commit_cli
from tcmu_obd.cli import create as create_cli

VSIZE_GB = 4


def make_tar(total, seed=7):
    rnd = random.Random(seed)
    blob = semi_compressible(8 * MiB, seed=seed)
    entries, n = [], 0
    while n < total:
        size = int(2 ** rnd.uniform(10, 22))
        at = rnd.randrange(0, len(blob) - size)
        entries.append((f"d{len(entries) % 37}/f{len(entries)}", blob[at:at + size]))
        n += size
    buf = io.BytesIO()
    write_tar(buf, entries)
    return buf.getvalue(), len(entries)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(env_line())
    with TempDir("bench-turbo") as tmp:
        tar, nfiles = make_tar(args.mib * MiB)
        tar_path = os.path.join(tmp, "layer.tar")
        gz_path = os.path.join(tmp, "layer.tar.gz")
        with open(tar_path, "wb") as f:
            f.write(tar)
        with open(gz_path, "wb") as f:
            f.write(gzip.compress(tar, 6, mtime=0))
        sizes = {}

        def clean(*names):
            for n in names:
                p = os.path.join(tmp, n)
                if os.path.exists(p):
                    os.unlink(p)

        def native_case(src, name):
            return lambda: native(src, name)

        def native(src, name):
            clean("n.data", "n.index", "n.commit")
            d, i = os.path.join(tmp, "n.data"), os.path.join(tmp, "n.index")
            create_cli.body(["--mkfs", d, i, str(VSIZE_GB)])
            cfg = os.path.join(tmp, "n.json")
            with open(cfg, "w") as f:
                json.dump({"lowers": [], "upper": {"data": d, "index": i}}, f)
            apply.apply_layer(src, cfg, frontend="fuse")
            commit_cli.body([d, i, os.path.join(tmp, "n.commit"), "-z"])
            sizes[name] = os.path.getsize(os.path.join(tmp, "n.commit"))

        def turbo_case(src, name):
            def run():
                clean("t.fsmeta", "t.index", "t.commit", "gzip.meta")
                d, i = os.path.join(tmp, "t.fsmeta"), os.path.join(tmp, "t.index")
                create_cli.body(["--turboOCI", "--mkfs", d, i, str(VSIZE_GB)])
                cfg = os.path.join(tmp, "t.json")
                with open(cfg, "w") as f:
                    json.dump({"lowers": [], "upper": {"data": d, "index": i, "target": src}}, f)
                turbo.turbo_apply(src, cfg, gz_index_path=os.path.join(tmp, "gzip.meta"), frontend="fuse")
                commit_cli.body([d, i, os.path.join(tmp, "t.commit"), "-z", "--turboOCI"])
                sizes[name] = os.path.getsize(os.path.join(tmp, "t.commit"))
                if os.path.exists(os.path.join(tmp, "gzip.meta")):
                    sizes[name + " index"] = os.path.getsize(os.path.join(tmp, "gzip.meta"))
            return run

        cases = [("native", native_case(tar_path, "native")), ("turboOCI", turbo_case(tar_path, "turboOCI")),
                 ("native gzip", native_case(gz_path, "native gzip")),
                 ("turboOCI gzip", turbo_case(gz_path, "turboOCI gzip"))]
        times = interleaved(cases, args.rounds)
        rows = []
        for name, _ in cases:
            t = statistics.median(times[name])
            r_best, r_med = ratio(times["native"], times[name])
            same = "native gzip" if "gzip" in name else "native"
            r_same = ratio(times[same], times[name])[1]
            meta = sizes[name] + sizes.get(name + " index", 0)
            rows.append([name, fmt(len(tar) / t / 1e6), fmt(t, 2), fmt(r_med, 2), fmt(r_best, 2),
                         fmt(r_same, 2), f"{meta:,}", f"{100.0 * meta / len(tar):.2f} %"])
        table(f"layer conversion: {len(tar) / MiB:.0f} MiB tar, {nfiles} files, vsize {VSIZE_GB} GiB, "
              f"{args.rounds} rounds",
              ["case", "MB/s", "s (median)", "x native (median)", "x native (best)",
               "x same-input native", "layer bytes", "of the tar"], rows,
              ["layer bytes: the committed -z layer (+ gzip.meta for the gzip case)",
               "native and TurboOCI both use FUSE + loop for the kernel's ext4"])


if __name__ == "__main__":
    main()
