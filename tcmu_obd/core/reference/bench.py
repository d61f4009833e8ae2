"""Benchmark-only entry points of the pure-Python twin (tcmu_obd.core.reference),
the counterparts of _lsmt_bench.pxi: loops that time one core operation.

Nothing in the product calls these.  The twin's timings mean nothing (it is
not the fast path); the differential tests compare only the checksums.
"""
import struct
import time

from tcmu_obd.core.reference._common import U64, rbuf, typed
from tcmu_obd.core.reference.index import Index


def bench_find(index, keys):
    """Benchmark only: look up every u64 key in `keys` (a buffer) with the
    index's search (first record whose end > key); returns (sum of the
    positions found, seconds)."""
    typed(index, Index, "index", none_ok=False)
    mv = rbuf(keys)
    cnt = len(mv) // 8
    ks = [k for (k,) in struct.iter_unpack("=Q", mv[:cnt * 8])]
    t0 = time.perf_counter()
    acc = 0
    for k in ks:
        acc += index._first_end_after(k)
    return acc & U64, time.perf_counter() - t0
