"""Writes into a writable (append-only) layer that already holds many
records, and reopening one (the index log replay), against plain pwrite.

  os.pwrite (baseline)   random 4 KiB writes of the same bytes at the same
                         offsets into a sparse flat file of the virtual size
  RWLayer.write          the same writes through the project's RW layer (data
                         append + 16-byte index record append + index insert),
                         into an upper holding 10k, 100k or 1M records
  Index.insert only      the in-memory insert alone (one Python call each), to
                         show what the write path spends outside the syscalls

Reopen: RWLayer.open of the 1M-record upper (read the log, replay it into the
B+tree, check it), against Index.from_raw + build_search of the same bytes
(what loading a committed layer's flat index of that size costs).

The uppers are built directly as files (the index log written as bytes, the
data file sparse), so setting up 1M records takes seconds.  Every round's
writes are checked by reading some of them back through an Image.  Not a
test of the read path (bench_read.py) or of commit (bench_commit.py).
"""
import argparse
import os
import random
import time

from _common import TempDir, env_line, fmt, interleaved, ratio, spread, table
from tcmu_obd import core
from tcmu_obd.image.stack import Image
from tcmu_obd.format.lsmt import HT_SPACE, SECTOR
from tcmu_obd.image.rw import RWLayer, encode_record

VSIZE = 64 << 30
SLOTS = VSIZE // 4096
BS = 4096


def build_upper(tmp, n):
    """An append-only upper whose log holds n 4 KiB records at distinct
    pseudo-random offsets (the data file is sparse behind them)."""
    d, i = os.path.join(tmp, f"data{n}"), os.path.join(tmp, f"index{n}")
    RWLayer.create(d, i, VSIZE).close()
    with open(i, "r+b") as f:
        f.seek(HT_SPACE)
        step = 1 << 16
        for s in range(0, n, step):
            f.write(b"".join(encode_record((k * 2654435761 % SLOTS) * 8, 8, 8 + 8 * k)
                             for k in range(s, min(n, s + step))))
    os.truncate(d, (8 + 8 * n) * SECTOR)
    return d, i


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="records in the upper")
    ap.add_argument("--writes", type=int, default=10000, help="4 KiB writes per trial")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    rnd = random.Random(a.seed)
    payload = bytes(rnd.randrange(256) for _ in range(BS))
    rows, rates = [], {}
    reopen_rows = []
    with TempDir("rw") as tmp:
        flat_path = os.path.join(tmp, "flat")
        flat = os.open(flat_path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(flat, VSIZE)
        for n in sizes:
            d, i = build_upper(tmp, n)
            t0 = time.perf_counter()
            layer = RWLayer.open(d, i)
            first_open = time.perf_counter() - t0
            assert len(layer.index) == n, (len(layer.index), n)
            image = Image([], layer)
            idx_copy = core.Index()
            idx_copy.replay(os.pread(layer.index_fd, n * 16, HT_SPACE))
            offsets = []

            def new_offsets():
                offsets[:] = [rnd.randrange(SLOTS) * BS for _ in range(a.writes)]

            def t_pwrite():
                new_offsets()
                t0 = time.perf_counter()
                for off in offsets:
                    os.pwrite(flat, payload, off)
                return time.perf_counter() - t0

            def t_rw():
                t0 = time.perf_counter()
                for off in offsets:         # the offsets t_pwrite just wrote
                    layer.write(payload, off)
                t = time.perf_counter() - t0
                for off in offsets[:: max(1, len(offsets) // 50)]:
                    assert image.read(off, BS) == payload
                return t

            def t_insert():
                ins = idx_copy.insert
                t0 = time.perf_counter()
                for k, off in enumerate(offsets):
                    ins(off // SECTOR, 8, 1 << 30 | k, False, 0)
                return time.perf_counter() - t0

            times = interleaved([("pwrite", t_pwrite), ("rw", t_rw), ("insert", t_insert)], a.rounds)
            base = [a.writes / t for t in times["pwrite"]]
            rw = [a.writes / t for t in times["rw"]]
            rates[n] = max(rw)
            r_best, r_med = ratio(times["pwrite"], times["rw"])
            ri_best, _ = ratio(times["pwrite"], times["insert"])
            label = f"{n:,} records"
            rows.append([label, "os.pwrite (baseline)", fmt(max(base) / 1e3), "1.00", "", f"{spread(times['pwrite']):.0f}%", ""])
            rows.append([label, "RWLayer.write", fmt(max(rw) / 1e3), f"{r_best:.2f}", f"{r_med:.2f}",
                         f"{spread(times['rw']):.0f}%", ("ok" if r_best >= 0.5 else "MISS") + " (>= 0.5)"])
            rows.append([label, "Index.insert only", fmt(a.writes / min(times["insert"]) / 1e3), f"{ri_best:.2f}", "",
                         f"{spread(times['insert']):.0f}%", ""])
            if n == max(sizes):
                # reopen: replay of the log vs a flat load of the same bytes
                layer.close()
                raw = open(i, "rb").read()[HT_SPACE:HT_SPACE + n * 16]

                def t_open():
                    t0 = time.perf_counter()
                    lay = RWLayer.open(d, i)
                    t = time.perf_counter() - t0
                    assert len(lay.index) >= n
                    lay.close()
                    return t

                def t_flat():
                    t0 = time.perf_counter()
                    idx = core.Index.from_raw(raw)
                    idx.build_search()
                    return time.perf_counter() - t0

                ot = interleaved([("flat", t_flat), ("open", t_open)], max(3, a.rounds // 2))
                o_best, o_med = ratio(ot["flat"], ot["open"])
                nrec = (os.path.getsize(i) - HT_SPACE) // 16
                reopen_rows.append([f"{nrec:,} log records", "Index.from_raw + build_search (baseline)",
                                    f"{min(ot['flat']):.3f}", "1.00", "", ""])
                reopen_rows.append([f"{nrec:,} log records", "RWLayer.open (replay + check)",
                                    f"{min(ot['open']):.3f}", f"{o_best:.3f}", f"{o_med:.3f}",
                                    ("ok" if min(ot["open"]) <= 2.0 else "MISS") + " (<= 2 s)"])
                reopen_rows.append([f"{n:,} log records", "RWLayer.open before the writes", f"{first_open:.3f}",
                                    "", "", ""])
            else:
                layer.close()
        os.close(flat)
    lo, hi = min(sizes), max(sizes)
    scale = rates[lo] / rates[hi]
    table(f"bench_rw: random 4 KiB writes into an upper holding N records ({a.writes:,} writes/trial, "
          f"{a.rounds} rounds)",
          ["upper", "path", "k writes/s", "ratio", "ratio med", "spread", "goal"], rows,
          [f"ratio = pwrite time / path time (best rounds); above 1 is faster than pwrite",
           f"RWLayer.write at {lo:,} / at {hi:,} records: {scale:.2f}x slower "
           f"({'ok' if scale <= 1.5 else 'MISS'}: goal <= 1.5)",
           env_line()])
    table("bench_rw: reopen (index log replay)", ["upper", "path", "seconds", "ratio", "ratio med", "goal"],
          reopen_rows, ["ratio = baseline time / path time (below 1: slower than the flat load)", env_line()])


if __name__ == "__main__":
    main()
