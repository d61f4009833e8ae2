"""Benchmark-only entry points of the Cython core (included by _lsmt.pyx):
loops that time a core operation from inside C, with the GIL released, so
bench/ measures the core and not the Python call around it.

Nothing in the product calls these; they are kept out of the production
classes on purpose.  The pure-Python twin has the same functions in
tcmu_obd.core.reference.bench (the differential tests compare their
checksums, never their timings).
"""


def bench_find(Index index, keys):
    """Benchmark only: look up every u64 key in `keys` (a buffer) with the
    index's search (first record whose end > key); returns (sum of the
    positions found, seconds) measured inside the core, GIL released."""
    cdef Index f = index._flat()
    cdef Py_buffer view
    cdef const uint64_t *k
    cdef Py_ssize_t i, cnt
    cdef uint64_t acc = 0
    cdef timespec t0, t1
    PyObject_GetBuffer(keys, &view, PyBUF_SIMPLE)
    try:
        k = <const uint64_t *>view.buf
        cnt = view.len // 8
        with nogil:
            clock_gettime(CLOCK_MONOTONIC, &t0)
            for i in range(cnt):
                acc += <uint64_t>f._first_end_after(k[i])
            clock_gettime(CLOCK_MONOTONIC, &t1)
    finally:
        PyBuffer_Release(&view)
    return acc, (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9
