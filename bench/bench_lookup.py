"""Segment lookups ("first record whose end > x") per second, measured inside
the core with bench_find (the core's benchmark-only entry point), at 1k and
1M records; with the bucket table (build_search) and without it (plain
binary search).

Baseline: the same keys through Python's bisect.bisect_right over a list of
record ends (one Python call per key), ratio = core rate / bisect rate.  Every
configuration's checksum (sum of the positions found) is compared with the
bisect one before it is reported.  Index.find (one Python call per key) is
shown for scale.

Layouts:
  uniform  records of 1..256 sectors with gaps of 0..256 sectors
  endgap   the uniform records, plus one record 63x further out (a disk
           whose data sits at the start, with e.g. a backup GPT at its
           very end): build_search sizes its buckets by all but the
           farthest n/1024 records, so the far one does not coarsen them
"""
import argparse
import bisect
import random
import statistics
import threading
import time
from array import array

from _common import env_line, fmt, table
from tcmu_obd import core

if core.IMPLEMENTATION == "cython":         # the benchmark-only entry point of whichever core runs
    from tcmu_obd.core._lsmt import bench_find
else:
    from tcmu_obd.core.reference.bench import bench_find


def make_index(n, layout, rng):
    """An Index of n records (from on-disk bytes) and the list of their ends."""
    raw = array("Q")
    ends = []
    pos = 0
    length_bits = 50
    for i in range(n):
        pos += rng.randrange(0, 257)
        ln = rng.randrange(1, 257)
        raw.append(pos | (ln << length_bits))
        raw.append(i * 256 % (1 << 40))
        pos += ln
        ends.append(pos)
    if layout == "endgap":
        # replace the last record by one far away at 64x the data's extent
        far = pos * 64
        raw[-2] = far | (8 << length_bits)
        ends[-1] = far + 8
    return raw, ends


def keys_for(ends, count, rng, layout):
    """Uniform over the records (for endgap: over the dense part, where the
    data is; keys in the empty far range are trivially answered)."""
    hi = (ends[-2] if layout == "endgap" else ends[-1]) + 16
    return array("Q", (rng.randrange(hi) for _ in range(count)))


def bisect_rate(ends, keys):
    br = bisect.bisect_right
    acc = 0
    t0 = time.perf_counter()
    for k in keys:
        acc += br(ends, k)
    return acc, len(keys) / (time.perf_counter() - t0)


def find_rate(idx, keys):
    f = idx.find
    acc = 0
    t0 = time.perf_counter()
    for k in keys:
        acc += f(k)
    return acc, len(keys) / (time.perf_counter() - t0)


def core_rate(idx, keys, rounds):
    rates = []
    acc = None
    for _ in range(rounds):
        a, secs = bench_find(idx, keys)
        if acc is not None and a != acc:
            raise SystemExit("bench_lookup: bench_find checksum changed between runs")
        acc = a
        rates.append(len(keys) / secs)
    return acc, max(rates), statistics.median(rates)


def gil_probe(idx, keys):
    """Run bench_find in a thread while the main thread holds the GIL in one
    long C call (sum over a range).  A lookup path that never takes the GIL
    finishes inside the hold; one that re-acquires it (as the core did when
    its nogil helpers lacked `noexcept`: Cython then checks for a Python
    error after each call, under the GIL) stalls until the hold ends."""
    _, alone = bench_find(idx, keys)
    t0 = time.perf_counter()
    sum(range(1_000_000))
    per_m = time.perf_counter() - t0
    hold_n = int(max(0.25, 5 * alone) / per_m * 1_000_000)
    res = {}
    go = threading.Event()

    def worker():
        go.set()
        res["t"] = bench_find(idx, keys)[1]

    th = threading.Thread(target=worker)
    th.start()
    go.wait()
    t0 = time.perf_counter()
    sum(range(hold_n))
    hold = time.perf_counter() - t0
    th.join()
    return alone, res["t"], hold


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=2_000_000, help="keys per core run")
    ap.add_argument("--pykeys", type=int, default=200_000, help="keys for the Python-call baselines")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    rows = []
    notes = []
    for n, layout in ((1000, "uniform"), (1_000_000, "uniform"), (1_000_000, "endgap")):
        raw, ends = make_index(n, layout, rng)
        plain = core.Index.from_raw(raw)
        fast = core.Index.from_raw(raw)
        fast.build_search()
        assert len(plain) == n and plain.check_sorted() == -1
        keys = keys_for(ends, a.keys, rng, layout)
        pykeys = keys[:a.pykeys]
        want, b_rate = max((bisect_rate(ends, pykeys) for _ in range(3)), key=lambda r: r[1])
        # correctness: the core's positions for the Python keys must match bisect's
        for name, idx in (("bucket", fast), ("binary", plain)):
            got, _ = bench_find(idx, pykeys)
            if got != want:
                raise SystemExit(f"bench_lookup: {name} search checksum {got} != bisect {want} "
                                 f"({n} records, {layout})")
        got, f_rate = max((find_rate(fast, pykeys) for _ in range(3)), key=lambda r: r[1])
        assert got == want
        label = f"{n:,} {layout}"
        rows.append([label, "bisect.bisect_right (Python)", fmt(b_rate / 1e6, 2), "1.00 (base)", "", ""])
        rows.append([label, "Index.find (1 Python call/key)", fmt(f_rate / 1e6, 2), f"{f_rate / b_rate:.2f}", "",
                     ""])
        for name, idx in (("bench_find, build_search", fast), ("bench_find, binary search", plain)):
            _, r_best, r_med = core_rate(idx, keys, a.rounds)
            goal = ""
            if n >= 1_000_000 and "build_search" in name:
                goal = ">= 30 M/s " + ("ok" if r_best >= 30e6 else "MISS")
            rows.append([label, name, fmt(r_best / 1e6, 1), fmt(r_best / b_rate, 1), fmt(r_med / 1e6, 1), goal])
        if n == 1_000_000 and layout == "uniform":
            probe = gil_probe(fast, keys)
        if n >= 1_000_000:
            notes.append(describe_buckets(ends, label))
    table("bench_lookup: index lookups (first record whose end > key)",
          ["index", "method", "M/s", "ratio", "M/s med", "goal"], rows,
          ["M/s = lookups per second (millions), best of "
           f"{a.rounds} core runs of {a.keys:,} random keys (bench_find: timed inside the core, GIL released); "
           "M/s med = median run",
           f"ratio = rate / bisect rate (bisect and Index.find: best of 3 runs over {a.pykeys:,} of the same keys)",
           "keys uniform over [0, last end + 16) sectors (endgap: over the dense records); "
           "all methods checked to return the same positions",
           "endgap = the uniform records with the last one moved 63x further out (data at the start of a "
           "disk, e.g. a backup GPT at its very end)",
           *notes,
           env_line()])
    alone, during, hold = probe
    table("bench_lookup: GIL independence of the lookup path (1,000,000 uniform, build_search)",
          ["case", "bench_find ms", "GIL held elsewhere ms", "finished during the hold"],
          [["bench_find alone", f"{alone * 1e3:.1f}", "", ""],
           ["bench_find while the main thread holds the GIL", f"{during * 1e3:.1f}", f"{hold * 1e3:.0f}",
            "yes" if during < hold else "NO: the core waits for the GIL"]],
          ["the main thread holds the GIL in one C call (sum(range(n))) for max(0.25 s, 5x the alone time); "
           "bench_find times itself inside the core, so a path that needs the GIL shows the hold in its time",
           "on 2 cores shared with other jobs the 'during' time can also grow from CPU contention; "
           "only finishing after the hold means the GIL was needed"])


def describe_buckets(ends, label):
    """The bucket table build_search makes for these ends (mirrors its rule:
    shift grows until the end of all but the farthest n/1024 records, >> shift,
    is <= 2n; the table has at most 4n+2 buckets), as one line."""
    n = len(ends)
    limit = ends[n - 1 - (n >> 10)]
    shift = 0
    while (limit >> shift) > 2 * n and shift < 62:
        shift += 1
    nb = min((ends[-1] >> shift) + 2, 4 * n + 2)
    counts = {}
    for e in ends:
        b = min(e >> shift, nb - 1)
        counts[b] = counts.get(b, 0) + 1
    return (f"{label}: build_search picks shift {shift} ({1 << shift} sectors per bucket, {nb:,} buckets); "
            f"{n:,} records share {len(counts):,} occupied buckets ({n / len(counts):.1f} per bucket on "
            f"average, up to {max(counts.values())}) and a lookup binary-searches its bucket "
            f"(past the table: the records left beyond it)")


if __name__ == "__main__":
    main()
