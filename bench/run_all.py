"""Run every benchmark in bench/ (each in its own process, one after the
other) and print all their tables.  Exit status 1 if any of them failed.

    python bench/run_all.py            # all of them
    python bench/run_all.py read zfile # only bench_read.py and bench_zfile.py
"""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ["bench_lookup", "bench_read", "bench_zfile", "bench_gzip", "bench_commit", "bench_rw", "bench_remote", "bench_fuse", "bench_convert",
           "bench_seed", "bench_tcmu", "bench_warp", "bench_turbo", "bench_erofs"]


def main(argv):
    chosen = [b for b in BENCHES if not argv or b in argv or b.replace("bench_", "") in argv]
    unknown = [a for a in argv if a not in BENCHES and "bench_" + a not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {' '.join(unknown)}; known: {' '.join(BENCHES)}", file=sys.stderr)
        return 2
    failed = []
    t_all = time.perf_counter()
    for name in chosen:
        print(f"\n######## {name}.py", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, os.path.join(HERE, name + ".py")], cwd=HERE)
        print(f"######## {name}.py: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.1f}s",
              flush=True)
        if rc:
            failed.append(name)
    print(f"\nall benchmarks: {time.perf_counter() - t_all:.1f}s"
          + (f"; failed: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
