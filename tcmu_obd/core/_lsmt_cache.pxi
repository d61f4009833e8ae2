"""Cache presence and fetch for the Cython core (included by _lsmt.pyx):
the Presence bitmap of a cached remote file (native/presence.c),
fetch_all(), and the step after a failed read (recover: fetch the misses,
evict and refetch a block that failed its check, or give up) with the one
place that turns an Err into an exception (raise_err, through
tcmu_obd.core.readerr).

It does not know registries or cache directories: a fetcher object
(tcmu_obd.remote) does the fetching; this part only decides what to ask it.
"""

cdef class Presence:
    """Which `unit`-sized pieces of a cached file hold data (see presence.h)."""
    cdef obd_presence p

    def __init__(self, uint64_t size, uint64_t unit):
        cdef unsigned shift = 0
        if unit < 512 or unit & (unit - 1):
            raise UsageError(f"presence unit {unit}: must be a power of two >= 512")
        while (<uint64_t>1 << shift) < unit:
            shift += 1
        if obd_presence_init(&self.p, size, shift):
            raise MemoryError()

    def __dealloc__(self):
        obd_presence_destroy(&self.p)

    @property
    def unit(self):
        return 1 << self.p.shift

    def set(self, uint64_t offset, uint64_t length):
        obd_presence_set(&self.p, offset, length, 1)

    def clear(self, uint64_t offset, uint64_t length):
        obd_presence_set(&self.p, offset, length, 0)

    def has(self, uint64_t offset, uint64_t length):
        cdef uint64_t mo, ml
        return not obd_presence_missing(&self.p, offset, length, &mo, &ml)

    def count(self, uint64_t offset, uint64_t length):
        """Bytes of the units touched by [offset, offset+length) that are present."""
        return obd_presence_count(&self.p, offset, length)

    def touch(self):
        """Note a use (a read of the blob does it in the core)."""
        obd_presence_touch(&self.p)

    @property
    def last_used(self):
        """Use stamp of the last read: larger is more recent (process-wide clock)."""
        return self.p.used

    def evict(self, int fd, uint64_t offset, uint64_t length):
        """Clear every unit [offset, offset+length) touches and punch them out of
        fd (-1: bits only), with no read of this blob in between.  Returns
        (bytes that were present, errno of a failed punch or 0)."""
        cdef uint64_t freed
        cdef int err = 0
        with nogil:
            freed = obd_presence_evict(&self.p, fd, offset, length, &err)
        return freed, err

    def pread(self, int fd, uint64_t offset, uint64_t length):
        """Bytes [offset, offset+length) of fd if all their units are present,
        read with no eviction in between; None if some are missing."""
        cdef int rc
        if length > self.p.size or offset > self.p.size - length:
            raise UsageError(f"read of {length} bytes at {offset} is past the blob's {self.p.size} bytes")
        out = PyBytes_FromStringAndSize(NULL, length)
        cdef char *dst = PyBytes_AS_STRING(out)
        with nogil:
            rc = obd_presence_pread(&self.p, fd, dst, offset, length)
        if rc < 0:
            import os
            raise OSError(errno, os.strerror(errno))
        return None if rc else out

    def store(self, int fd, data, uint64_t offset):
        """pwrite data at offset into fd, then mark its units present, with no
        eviction in between (OSError, nothing marked, if the write fails)."""
        cdef Py_buffer view
        cdef int rc
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if <uint64_t>view.len > self.p.size or offset > self.p.size - <uint64_t>view.len:
                raise UsageError(f"write of {view.len} bytes at {offset} is past the blob's {self.p.size} bytes")
            with nogil:
                rc = obd_presence_store(&self.p, fd, <const char *>view.buf, offset, view.len)
        finally:
            PyBuffer_Release(&view)
        if rc:
            import os
            raise OSError(errno, os.strerror(errno))

    def bitmap(self):
        """The bits as bytes, unit u at bit u % 8 of byte u // 8."""
        cdef uint64_t u
        out = bytearray((self.p.nunits + 7) // 8)
        for u in range(self.p.nunits):
            if (self.p.bits[u >> 6] >> (u & 63)) & 1:
                out[u >> 3] |= 1 << (u & 7)
        return bytes(out)

    def set_bitmap(self, bits):
        """Mark present the units whose bit is set in `bits` (as bitmap() makes)."""
        cdef uint64_t u
        cdef const unsigned char[:] b = bits
        if <uint64_t>len(bits) != (self.p.nunits + 7) // 8:
            raise UsageError(f"bitmap of {len(bits)} bytes for {self.p.nunits} units")
        for u in range(self.p.nunits):
            if (b[u >> 3] >> (u & 7)) & 1:
                obd_presence_set(&self.p, u << self.p.shift, 1 << self.p.shift, 1)

    def missing(self, uint64_t offset, uint64_t length):
        """Missing byte ranges inside [offset, offset+length), whole units."""
        out = []
        cdef uint64_t unit = 1 << self.p.shift, u, end = min(offset + length, self.p.size)
        cdef uint64_t mo, ml
        cdef Py_ssize_t k
        if offset >= end:
            return out
        for u in range(offset >> self.p.shift, ((end - 1) >> self.p.shift) + 1):
            if obd_presence_missing(&self.p, u * unit, 1, &mo, &ml):
                k = len(out) - 1
                if k >= 0 and out[k][0] + out[k][1] == mo:
                    out[k] = (out[k][0], out[k][1] + ml)
                else:
                    out.append((mo, ml))
        return out


MAX_CRC_RETRIES = 2    # evict-and-refetch rounds per cached block that fails its check
MAX_MISS_ROUNDS = 64   # fetch rounds one read may need (misses evicted again before use)
_fetch_pool = None


def fetch_all(jobs):
    """Run fetcher.ensure(off, n) for every job, in parallel when there are
    several (a read spanning layers pays one round trip, not one per layer)."""
    global _fetch_pool
    if len(jobs) == 1:
        jobs[0][0].ensure(jobs[0][1], jobs[0][2])
        return
    if _fetch_pool is None:
        from concurrent.futures import ThreadPoolExecutor
        _fetch_pool = ThreadPoolExecutor(16, thread_name_prefix="obd-fetch")
    futures = [_fetch_pool.submit(f.ensure, off, n) for f, off, n in jobs]
    for fut in futures:
        fut.result()


cdef pin_all(list jobs, dict tries):
    """Pin what a read is about to fetch until the read ends (unpin_all), so
    eviction for other reads cannot take it first; fetchers without pin()
    are left as they are."""
    pins = tries.setdefault("pins", [])
    for f, off, n in jobs:
        pin = getattr(f, "pin", None)
        if pin is not None:
            pins.append((f, pin(off, n)))


cdef unpin_all(dict tries):
    for f, token in tries.pop("pins", ()):
        f.unpin(token)


cdef int recover(Err *err, list files, dict tries) except -1:
    """After a failed read: fetch what the cache lacks, or evict a cached
    block that failed its check.  1 means read again, 0 means give up.
    `tries` (one per read call) counts refetches per (file, block), so a read
    heals any number of bad blocks but none more than MAX_CRC_RETRIES times,
    and the fetch rounds, so a cache too small for one read fails it."""
    cdef Backing b
    cdef int k
    if err.code == E_MISS:
        rounds = tries.get("miss", 0) + 1
        tries["miss"] = rounds
        if rounds > MAX_MISS_ROUNDS:
            name = files[err.which].name if 0 <= err.which < len(files) else "<backing>"
            raise ReadError(f"{name}: bytes {err.a}..{err.a + err.b} were evicted again before the read "
                            f"could use them, {MAX_MISS_ROUNDS} times (cache too small for this read?)")
    if err.code == E_MISS and err.nmiss > 0:
        jobs = []
        for k in range(err.nmiss):
            b = files[err.mtag[k]]
            if b.fetcher is None:
                return 0
            jobs.append((b.fetcher, err.moff[k], err.mlen[k]))
        pin_all(jobs, tries)
        fetch_all(jobs)
        return 1
    if not 0 <= err.which < len(files):
        return 0
    b = files[err.which]
    if b.fetcher is None:
        return 0
    if err.code == E_MISS:
        pin_all([(b.fetcher, err.a, err.b)], tries)
        b.fetcher.ensure(err.a, err.b)
        return 1
    key = (err.which, err.a)
    if (err.code == E_CRC or err.code == E_DECODE) and b.c.kind == K_ZFILE and err.a < b.c.nblocks \
            and tries.get(key, 0) < MAX_CRC_RETRIES:
        tries[key] = tries.get(key, 0) + 1
        b.fetcher.evict(b.c.base + b.c.boff[err.a], b.c.boff[err.a + 1] - b.c.boff[err.a])
        return 1
    return 0


cdef count_recovered(int rc, dict tries):
    """Tell tcmu_obd.stats about a read that went through recover(): it
    fetched (a "miss" round), and the blocks it refetched after a failed
    check, which count as healed when the read then succeeded."""
    healed = sum(1 for k in tries if type(k) is tuple) if rc == 0 else 0
    if "miss" in tries:
        stats.read_fetched(healed)
    elif healed:
        stats.read_healed(healed)


cdef int raise_err(Err *err, list files) except -1:
    """Raise the exception for a failed read (the messages: tcmu_obd.core.readerr)."""
    name = files[err.which].name if 0 <= err.which < len(files) else "<backing>"
    raise readerr.exception(err.code, name, err.err_no, err.a, err.b, err.c)
