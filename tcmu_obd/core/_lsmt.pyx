# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The Cython read core of tcmu-obd: index records, lookup, stack merge,
read-merge into the caller's buffer, and ZFile block decode/encode.

It knows sectors, records, file descriptors and compressed blocks; it knows
nothing of headers, configs, paths or registries (tcmu_obd.image.layer and
tcmu_obd.image.stack do that and hand it open descriptors and parsed tables).  Every
loop over records, buffers or blocks runs with the GIL released; a read costs
one Python call.  tcmu_obd.core.reference is a pure-Python twin of this module with
the same API, and the differential tests hold the two to the same answers.

Units: every offset/length/moffset of a record is in 512-byte sectors; every
argument named *_bytes, and the offsets of read()/read_into(), are bytes.
"""

from libc.stdint cimport uint64_t, uint32_t, uint8_t, int64_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcpy, memset, memmove
from libc.errno cimport errno, EINTR, EINVAL
from posix.unistd cimport pread
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.pycapsule cimport PyCapsule_New
from cpython.exc cimport PyErr_CheckSignals
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from tcmu_obd.errors import CorruptDataError, FormatError, ReadError, UsageError

cdef extern from "crc32c.h" nogil:
    uint32_t obd_crc32c(uint32_t seed, const void *data, size_t n)
    int obd_crc32c_hw()

cdef extern from "lz4.h" nogil:
    int LZ4_decompress_safe(const char *src, char *dst, int csize, int cap)
    int LZ4_compress_default(const char *src, char *dst, int size, int cap)
    int LZ4_compressBound(int size)

cdef extern from "blockcache.h" nogil:
    ctypedef struct obd_bcache:
        pass
    obd_bcache *obd_bcache_new(unsigned nslots, size_t block_size)
    void obd_bcache_free(obd_bcache *c)
    int obd_bcache_get(obd_bcache *c, uint64_t blk, char *dst, size_t at, size_t n)
    void obd_bcache_put(obd_bcache *c, uint64_t blk, char **buf)
    void obd_bcache_clear(obd_bcache *c)

cdef extern from "presence.h" nogil:
    ctypedef struct obd_presence:
        uint64_t *bits
        uint64_t nunits
        unsigned shift
        uint64_t size
        uint64_t used
    int obd_presence_init(obd_presence *p, uint64_t size, unsigned shift)
    void obd_presence_destroy(obd_presence *p)
    void obd_presence_set(obd_presence *p, uint64_t off, uint64_t n, int on)
    int obd_presence_missing(const obd_presence *p, uint64_t off, uint64_t n, uint64_t *moff, uint64_t *mlen)
    uint64_t obd_presence_count(const obd_presence *p, uint64_t off, uint64_t n)
    void obd_presence_touch(obd_presence *p)
    uint64_t obd_presence_evict(obd_presence *p, int fd, uint64_t off, uint64_t n, int *err)
    int obd_presence_pread(obd_presence *p, int fd, char *dst, uint64_t off, uint64_t n)
    int obd_presence_store(obd_presence *p, int fd, const char *src, uint64_t off, uint64_t n)
    int obd_presence_rdlock "pthread_rwlock_rdlock"(void *lock)
    int obd_presence_unlock "pthread_rwlock_unlock"(void *lock)

cdef extern from * nogil:
    """
    #define OBD_PRESENCE_LOCK(p) (&(p)->lock)
    """
    void *OBD_PRESENCE_LOCK(obd_presence *p)

cdef extern from "codec.h" nogil:
    int obd_codec_prepare()
    uint64_t obd_codec_armed_allocs()
    size_t obd_zstd_decompress(void *dst, size_t cap, const void *src, size_t csize)
    size_t obd_zstd_compress(void *dst, size_t cap, const void *src, size_t size, int level)

cdef extern from "mapguard.h" nogil:
    int OBD_GUARD_FAULT
    int obd_mapguard_install()
    int obd_guarded(int (*fn)(void *) noexcept nogil, void *arg, const void *lo, size_t length)
    uint64_t obd_mapguard_recovered()
    int obd_map(int fd, uint64_t off, uint64_t length, const char **base, void **mapping, size_t *maplen)
    void obd_unmap(void *mapping, size_t maplen)

cdef extern from "zstd.h" nogil:
    size_t ZSTD_compressBound(size_t size)
    unsigned ZSTD_isError(size_t code)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t *, void *)
    int pthread_rwlock_destroy(pthread_rwlock_t *)
    int pthread_rwlock_rdlock(pthread_rwlock_t *)
    int pthread_rwlock_wrlock(pthread_rwlock_t *)
    int pthread_rwlock_unlock(pthread_rwlock_t *)

# ---------------------------------------------------------------- constants
cdef extern from *:
    """
    #define OBD_INVALID_OFFSET ((uint64_t)((1ULL << 50) - 1))
    #define OBD_MAX_LENGTH ((uint64_t)((1ULL << 14) - 1))
    #define OBD_MAX_MOFFSET ((uint64_t)((1ULL << 55) - 1))
    """
    const uint64_t INVALID_OFFSET "OBD_INVALID_OFFSET"
    const uint64_t MAX_LENGTH "OBD_MAX_LENGTH"
    const uint64_t MAX_MOFFSET "OBD_MAX_MOFFSET"
DEF SECTOR = 512
DEF MAX_IO = 4 * 1024 * 1024
DEF MAX_INDEX = 128000000
DEF ZF_SALT = 100007
DEF ALGO_LZ4 = 1
DEF ALGO_ZSTD = 2
DEF ZSTD_LEVEL = 3
DEF COALESCE_MAX = 1 << 20      # largest single pread of compressed bytes
DEF STACK_CBUF = 16384          # compressed bytes a ZFile read keeps on the stack
DEF BLOCK_CACHE_SLOTS = 64
DEF MAX_MISSES = 64             # cache misses one stack read collects before it asks for them      # decoded blocks kept per ZFile (<= 4 MiB at 64 KiB blocks)

SALT = ZF_SALT
CRC_HW = bool(obd_crc32c_hw())   # also initialises the tables once, before any thread


def crc32c(data, uint32_t seed=0):
    """overlaybd's raw CRC32C of a bytes-like object, from `seed`."""
    cdef Py_buffer view
    cdef uint32_t r
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            r = obd_crc32c(seed, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return r


# ---------------------------------------------------------------- records
cdef extern from "rwindex.h" nogil:
    ctypedef struct Rec "obd_rec":
        uint64_t offset
        uint64_t moffset
        uint32_t length
        uint8_t zeroed
        uint8_t tag
    ctypedef struct obd_rwidx:
        pass
    ctypedef struct obd_rwcur:
        void *leaf
        int pos
    obd_rwidx *obd_rwidx_new()
    void obd_rwidx_free(obd_rwidx *t)
    uint64_t obd_rwidx_count(const obd_rwidx *t)
    int obd_rwidx_height(const obd_rwidx *t)
    int obd_rwidx_insert(obd_rwidx *t, const Rec *r)
    const Rec *obd_rwidx_seek(const obd_rwidx *t, uint64_t x, obd_rwcur *c)
    const Rec *obd_rwcur_next(obd_rwcur *c)
    void obd_rwidx_copy(const obd_rwidx *t, Rec *out)
    int obd_rwidx_check(const obd_rwidx *t)
    int obd_rwlock_init_wpref(pthread_rwlock_t *l)
    int obd_rwlock_probe_writer_pref(pthread_rwlock_t *l)

DEF REPLAY_CHUNK = 65536        # log records replayed per GIL-free step; signals are checked between steps
DEF SIGNAL_EVERY = 65536        # records a loop holding the GIL handles between signal checks


cdef inline uint64_t rend(const Rec *r) noexcept nogil:
    return r.offset + r.length


cdef inline void decode_rec(const unsigned char *p, Rec *r) noexcept nogil:
    cdef uint64_t w0, w1
    memcpy(&w0, p, 8)
    memcpy(&w1, p + 8, 8)
    r.offset = w0 & INVALID_OFFSET
    r.length = <uint32_t>(w0 >> 50)
    r.moffset = w1 & MAX_MOFFSET
    r.zeroed = <uint8_t>((w1 >> 55) & 1)
    r.tag = <uint8_t>(w1 >> 56)


cdef inline void encode_rec(const Rec *r, unsigned char *p) noexcept nogil:
    cdef uint64_t w0 = (r.offset & INVALID_OFFSET) | ((<uint64_t>r.length) << 50)
    cdef uint64_t w1 = (r.moffset & MAX_MOFFSET) | ((<uint64_t>r.zeroed) << 55) | ((<uint64_t>r.tag) << 56)
    memcpy(p, &w0, 8)
    memcpy(p + 8, &w1, 8)


cdef class Index:
    """The records of a layer, sorted and non-overlapping, in C memory.

    Two shapes behind one API.  A flat array: built from raw on-disk bytes
    (from_raw), from_records, or by merge(); lookups use a bucket table over
    the record ends once build_search() ran, else a binary search.  A B+tree
    (native/rwindex.c): an index that takes writes (the first insert() or
    replay() turns it into one), where an insert costs O(log n) and the newer
    record wins.  Either shape is guarded by a writer-preferring rwlock: the
    read core takes it shared without the GIL; a writer releases the GIL
    before it waits for it.  Inspection methods (records, dump, record, find,
    check_*) work on a copy of the tree taken under the lock.
    """
    cdef Rec *recs
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef uint32_t *buckets
    cdef int shift
    cdef uint64_t nbuckets
    cdef obd_rwidx *tree            # non-NULL: records live in the tree; recs/n are unused
    cdef pthread_rwlock_t lock

    def __cinit__(self):
        self.recs = NULL
        self.n = 0
        self.cap = 0
        self.buckets = NULL
        self.nbuckets = 0
        self.tree = NULL
        if obd_rwlock_init_wpref(&self.lock) != 0:
            raise MemoryError("cannot initialise the index lock")

    def __dealloc__(self):
        free(self.recs)
        free(self.buckets)
        obd_rwidx_free(self.tree)
        pthread_rwlock_destroy(&self.lock)

    cdef int _reserve(self, Py_ssize_t want) except -1:
        cdef Py_ssize_t ncap
        cdef Rec *p
        if want <= self.cap:
            return 0
        if want > MAX_INDEX:
            raise FormatError("<index>", "record count", want, f"more than {MAX_INDEX} records")
        ncap = max(want, self.cap * 2, 64)
        p = <Rec *>realloc(self.recs, ncap * sizeof(Rec))
        if p == NULL:
            raise MemoryError()
        self.recs = p
        self.cap = ncap
        return 0

    cdef inline int _push(self, const Rec *r) except -1:
        if self.n >= self.cap:
            self._reserve(self.n + 1)
        self.recs[self.n] = r[0]
        self.n += 1
        return 0

    cdef inline void _wrlock(self) noexcept:
        with nogil:
            pthread_rwlock_wrlock(&self.lock)

    cdef inline void _rdlock(self) noexcept:
        with nogil:
            pthread_rwlock_rdlock(&self.lock)

    cdef inline void _unlock(self) noexcept nogil:
        pthread_rwlock_unlock(&self.lock)

    # -------------------------------------------------------- construction
    @staticmethod
    def from_raw(data, bint keep_tags=False):
        """Records from on-disk bytes (16 each), invalid ones dropped, in
        file order; tags are forced to 0 unless keep_tags."""
        cdef Index idx = Index()
        cdef Py_buffer view
        cdef Py_ssize_t i, cnt
        cdef const unsigned char *p
        cdef Rec r
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            cnt = view.len // 16
            idx._reserve(cnt)
            p = <const unsigned char *>view.buf
            with nogil:
                for i in range(cnt):
                    decode_rec(p + 16 * i, &r)
                    if r.offset == INVALID_OFFSET:
                        continue
                    if not keep_tags:
                        r.tag = 0
                    idx.recs[idx.n] = r
                    idx.n += 1
        finally:
            PyBuffer_Release(&view)
        return idx

    @staticmethod
    def from_records(records):
        """From an iterable of (offset, length, moffset, zeroed, tag), kept in order."""
        cdef Index idx = Index()
        cdef Rec r
        for rec in records:
            idx._reserve(idx.n + 1)
            r.offset, r.length, r.moffset, r.zeroed, r.tag = rec
            idx.recs[idx.n] = r
            idx.n += 1
            if idx.n % SIGNAL_EVERY == 0:
                PyErr_CheckSignals()
        return idx

    cdef int _to_tree(self) except -1:
        """Move the flat records into a B+tree (in order: a later record
        wins over an earlier one it overlaps)."""
        cdef obd_rwidx *t
        cdef Py_ssize_t i
        cdef int rc = 0
        if self.tree != NULL:
            return 0
        t = obd_rwidx_new()
        if t == NULL:
            raise MemoryError()
        self._wrlock()
        for i in range(self.n):
            if self.recs[i].length and obd_rwidx_insert(t, &self.recs[i]) != 0:
                rc = -1
                break
        if rc == 0:
            free(self.recs)
            free(self.buckets)
            self.recs = NULL
            self.buckets = NULL
            self.n = self.cap = 0
            self.nbuckets = 0
            self.tree = t
        self._unlock()
        if rc:
            obd_rwidx_free(t)
            raise MemoryError()
        return 0

    def replay(self, data):
        """Apply an RW index log in file order: invalid and zero-length
        records skipped, tags forced to 0, each newer record wins.  Runs
        without the GIL in steps of REPLAY_CHUNK records; a signal (Ctrl-C,
        SIGTERM through the tools' handler) raises between steps."""
        cdef Py_buffer view
        cdef Py_ssize_t i, k, stop, cnt
        cdef const unsigned char *p
        cdef Rec r
        cdef int rc = 0
        self._to_tree()
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            cnt = view.len // 16
            p = <const unsigned char *>view.buf
            i = 0
            while i < cnt:
                stop = min(cnt, i + REPLAY_CHUNK)
                with nogil:
                    pthread_rwlock_wrlock(&self.lock)
                    for k in range(i, stop):
                        decode_rec(p + 16 * k, &r)
                        if r.offset == INVALID_OFFSET or r.length == 0:
                            continue
                        r.tag = 0
                        if obd_rwidx_insert(self.tree, &r) != 0:
                            rc = -1
                            break
                    pthread_rwlock_unlock(&self.lock)
                if rc:
                    raise MemoryError(f"out of memory replaying index record {k}")
                i = stop
                PyErr_CheckSignals()
        finally:
            PyBuffer_Release(&view)

    def insert(self, uint64_t offset, uint32_t length, uint64_t moffset, bint zeroed=False, uint8_t tag=0):
        """Insert one record; whatever it overlaps is cut away (newer wins)."""
        cdef Rec r
        cdef int rc
        if length == 0:
            return
        if length > MAX_LENGTH or offset > INVALID_OFFSET - length or moffset > MAX_MOFFSET:
            raise UsageError(f"record out of range: offset={offset} length={length} moffset={moffset}")
        if self.tree == NULL:
            self._to_tree()
        r.offset = offset
        r.length = length
        r.moffset = moffset
        r.zeroed = zeroed
        r.tag = tag
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            rc = obd_rwidx_insert(self.tree, &r)
            pthread_rwlock_unlock(&self.lock)
        if rc:
            raise MemoryError("out of memory inserting an index record")

    @property
    def is_tree(self):
        """True once the records live in the B+tree (a writable index)."""
        return self.tree != NULL

    def check_tree(self):
        """The B+tree's structural self-check: 0 when sound (tests)."""
        cdef int rc
        if self.tree == NULL:
            return 0
        self._rdlock()
        rc = obd_rwidx_check(self.tree)
        self._unlock()
        return rc

    def probe_writer_preference(self):
        """For tests: 1 when a queued writer keeps new readers out of this
        index's lock (so a constant read load cannot starve writes), 0 when
        readers still got in after 5 s of trying."""
        cdef int rc
        with nogil:
            rc = obd_rwlock_probe_writer_pref(&self.lock)
        if rc < 0:
            raise OSError("cannot start the probe thread")
        return rc

    cdef Index _flat(self):
        """self when flat; else a flat copy of the tree's records."""
        cdef Index f
        cdef Py_ssize_t cnt
        if self.tree == NULL:
            return self
        f = Index()
        while True:
            cnt = <Py_ssize_t>obd_rwidx_count(self.tree)
            f._reserve(cnt + 1)
            self._rdlock()
            if <Py_ssize_t>obd_rwidx_count(self.tree) <= f.cap:
                cnt = <Py_ssize_t>obd_rwidx_count(self.tree)
                with nogil:
                    obd_rwidx_copy(self.tree, f.recs)
                self._unlock()
                break
            self._unlock()              # it grew meanwhile: make room again
        f.n = cnt
        return f

    # -------------------------------------------------------- search
    def build_search(self):
        """Build the bucket table that makes lookups O(1) on average.
        Bucket b holds the first record whose end > b << shift.  Nothing
        to build for a tree."""
        cdef uint64_t maxend, limit, nb, b, key
        cdef int shift = 0
        cdef Py_ssize_t i
        cdef uint32_t *t
        if self.tree != NULL:
            return
        self._wrlock()
        try:
            free(self.buckets)
            self.buckets = NULL
            self.nbuckets = 0
            if self.n < 64:
                return
            # Size the buckets by where nearly all records are: a few far-out
            # records (a backup GPT at the end of the disk) must not make every
            # bucket hold dozens.  Past the table (at most 4n+2 buckets), a
            # lookup binary-searches the sparse tail that is left.
            maxend = rend(&self.recs[self.n - 1])
            limit = rend(&self.recs[self.n - 1 - (self.n >> 10)])
            while (limit >> shift) > <uint64_t>(2 * self.n) and shift < 62:
                shift += 1
            nb = (maxend >> shift) + 2
            if nb > <uint64_t>(4 * self.n + 2):
                nb = <uint64_t>(4 * self.n + 2)
            t = <uint32_t *>malloc(nb * sizeof(uint32_t))
            if t == NULL:
                raise MemoryError()
            with nogil:
                i = 0
                for b in range(nb):
                    key = b << shift
                    while i < self.n and rend(&self.recs[i]) <= key:
                        i += 1
                    t[b] = <uint32_t>i
            self.buckets = t
            self.nbuckets = nb
            self.shift = shift
        finally:
            self._unlock()

    cdef inline Py_ssize_t _first_end_after(self, uint64_t x) noexcept nogil:
        """Index of the first record whose end > x (n if none).  Flat only."""
        cdef Py_ssize_t lo = 0, hi = self.n, mid
        cdef uint64_t b
        if self.buckets != NULL:
            b = x >> self.shift
            if b + 1 >= self.nbuckets:
                lo = self.buckets[self.nbuckets - 1]     # past the table: the sparse tail
            else:
                lo = self.buckets[b]
                hi = self.buckets[b + 1]
        while lo < hi:
            mid = (lo + hi) >> 1
            if rend(&self.recs[mid]) > x:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def find(self, uint64_t x):
        """Position of the first record whose end > x (len(self) if none)."""
        return self._flat()._first_end_after(x)

    def bench_find(self, keys):
        """Look up every u64 key in `keys` (a buffer); returns (checksum,
        seconds) measured inside the core, GIL released."""
        cdef Index f = self._flat()
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

    # -------------------------------------------------------- inspection
    def __len__(self):
        if self.tree != NULL:
            return obd_rwidx_count(self.tree)
        return self.n

    def record(self, Py_ssize_t i):
        cdef Index f = self._flat()
        if i < 0 or i >= f.n:
            raise IndexError(i)
        r = &f.recs[i]
        return (r.offset, r.length, r.moffset, r.zeroed, r.tag)

    def records(self):
        cdef Index f = self._flat()
        cdef Py_ssize_t i
        cdef Rec *r
        out = []
        for i in range(f.n):
            r = &f.recs[i]
            out.append((r.offset, r.length, r.moffset, r.zeroed, r.tag))
            if i % SIGNAL_EVERY == SIGNAL_EVERY - 1:
                PyErr_CheckSignals()
        return out

    def check_sorted(self):
        """-1 when sorted and non-overlapping, else the position of the
        first record that starts before its predecessor ends."""
        cdef Index f = self._flat()
        cdef Py_ssize_t i
        for i in range(1, f.n):
            if f.recs[i].offset < rend(&f.recs[i - 1]):
                return i
        return -1

    def check_moffset(self, uint64_t lo, uint64_t hi):
        """-1 when every data record lies in [lo, hi) and every zeroed
        record has lo <= moffset <= hi; else the first bad position."""
        cdef Index f = self._flat()
        cdef Py_ssize_t i
        cdef Rec *r
        for i in range(f.n):
            r = &f.recs[i]
            if r.zeroed:
                if r.moffset < lo or r.moffset > hi:
                    return i
            elif r.moffset < lo or r.moffset >= hi or r.moffset + r.length > hi:
                return i
        return -1

    def data_sectors(self):
        """Sectors held by non-zeroed records (fstat's st_blocks)."""
        cdef Index f = self._flat()
        cdef uint64_t s = 0
        cdef Py_ssize_t i
        for i in range(f.n):
            if not f.recs[i].zeroed:
                s += f.recs[i].length
        return s

    def dump(self, Py_ssize_t pad_to=1):
        """On-disk bytes of the records (tags kept), padded with invalid
        records to a multiple of pad_to records."""
        cdef Index f = self._flat()
        cdef Py_ssize_t total = f.n, i
        cdef Rec inv
        if pad_to > 1 and total % pad_to:
            total += pad_to - total % pad_to
        out = PyBytes_FromStringAndSize(NULL, total * 16)
        cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
        inv.offset = INVALID_OFFSET
        inv.length = 0
        inv.moffset = 0
        inv.zeroed = 0
        inv.tag = 0
        for i in range(total):
            encode_rec(&f.recs[i] if i < f.n else &inv, p + 16 * i)
        return out

    def lookup(self, uint64_t offset, uint64_t length):
        """Records overlapping [offset, offset+length) in sectors, the first
        and last trimmed to it (moffset advanced unless zeroed)."""
        cdef uint64_t end = offset + length
        cdef Rec r
        cdef uint64_t cut
        cdef Cur c
        cdef const Rec *q
        cdef Rec *got = NULL
        cdef Rec *grown
        cdef Py_ssize_t ngot = 0, gcap = 0, i
        cdef bint nomem = False
        if end < offset:                  # saturate instead of wrapping
            end = <uint64_t>-1
        # collect under the lock (a tree), without the GIL; build the list after it
        if self.tree != NULL:
            self._rdlock()
        with nogil:
            q = cur_seek(self, offset, &c)
            while q != NULL and q.offset < end:
                if ngot == gcap:
                    gcap = gcap * 2 if gcap else 16
                    grown = <Rec *>realloc(got, gcap * sizeof(Rec))
                    if grown == NULL:
                        nomem = True
                        break
                    got = grown
                got[ngot] = q[0]
                ngot += 1
                q = cur_next(&c)
            if self.tree != NULL:
                pthread_rwlock_unlock(&self.lock)
        if nomem:
            free(got)
            raise MemoryError()
        out = []
        try:
            for i in range(ngot):
                r = got[i]
                if r.offset < offset:
                    cut = offset - r.offset
                    r.offset = offset
                    r.length -= <uint32_t>cut
                    if not r.zeroed:
                        r.moffset += cut
                if rend(&r) > end:
                    r.length = <uint32_t>(end - r.offset)
                out.append((r.offset, r.length, r.moffset, r.zeroed, r.tag))
                if i % SIGNAL_EVERY == SIGNAL_EVERY - 1:
                    PyErr_CheckSignals()
        finally:
            free(got)
        return out


# A position in either shape of Index, for loops that must not care which.
cdef struct Cur:
    const Rec *flat
    Py_ssize_t i
    Py_ssize_t n
    bint tree
    obd_rwcur tc


cdef inline const Rec *cur_seek(Index idx, uint64_t x, Cur *c) noexcept nogil:
    """The first record of idx whose end > x, or NULL.  The caller holds
    idx.lock shared when idx is a tree."""
    if idx.tree != NULL:
        c.tree = True
        return obd_rwidx_seek(idx.tree, x, &c.tc)
    c.tree = False
    c.flat = idx.recs
    c.n = idx.n
    c.i = idx._first_end_after(x)
    return &c.flat[c.i] if c.i < c.n else NULL


cdef inline const Rec *cur_next(Cur *c) noexcept nogil:
    if c.tree:
        return obd_rwcur_next(&c.tc)
    c.i += 1
    return &c.flat[c.i] if c.i < c.n else NULL


def merge(list layers):
    """Merge indexes given top-first into one: each layer fills only the
    holes left by the layers above it; tag = position in `layers`."""
    cdef Index acc = Index(), low, nxt
    cdef Py_ssize_t li, i, j, k, nr
    cdef Rec piece, L
    cdef uint64_t pos, e, gend
    if len(layers) > 255:
        raise FormatError("<stack>", "layer count", len(layers), "at most 255 read-only layers")
    for li in range(len(layers)):
        low = (<Index?>layers[li])._flat()
        nxt = Index()
        nxt._reserve(acc.n + 2 * low.n + 1)
        nr = acc.n
        i = 0
        for j in range(low.n):
            if j % SIGNAL_EVERY == SIGNAL_EVERY - 1:
                PyErr_CheckSignals()
            L = low.recs[j]
            L.tag = <uint8_t>li
            e = rend(&L)
            while i < nr and rend(&acc.recs[i]) <= L.offset:
                nxt._push(&acc.recs[i])
                i += 1
            pos = L.offset
            k = i
            while pos < e:
                if k < nr and acc.recs[k].offset <= pos:
                    pos = rend(&acc.recs[k])
                    k += 1
                    continue
                gend = e
                if k < nr and acc.recs[k].offset < e:
                    gend = acc.recs[k].offset
                while i < nr and acc.recs[i].offset < pos:
                    nxt._push(&acc.recs[i])
                    i += 1
                piece = L
                piece.offset = pos
                piece.length = <uint32_t>(gend - pos)
                if not L.zeroed:
                    piece.moffset = L.moffset + (pos - L.offset)
                nxt._push(&piece)
                pos = gend
        while i < nr:
            nxt._push(&acc.recs[i])
            i += 1
        acc = nxt
    acc.build_search()
    return acc




# ---------------------------------------------------------------- backings
DEF K_RAW = 1
DEF K_ZFILE = 2

DEF E_IO = 1
DEF E_SHORT = 2
DEF E_CRC = 3
DEF E_DECODE = 4
DEF E_RANGE = 5
DEF E_NOMEM = 6
DEF E_TAG = 7
DEF E_MISS = 8         # not in the cache file yet: a = file offset, b = length
DEF E_MAPFAULT = 9     # SIGBUS reading a mapping: the read is redone with pread
MAX_CRC_RETRIES = 2    # evict-and-refetch rounds per cached block that fails its check
MAX_MISS_ROUNDS = 64   # fetch rounds one read may need (misses evicted again before use)

cdef struct BackingC:
    int kind
    int fd
    uint64_t base          # where the backing's byte 0 lies in fd
    uint64_t size          # the backing's logical size in bytes
    uint32_t block_size    # ZFile only from here on
    int algo
    int verify
    uint64_t nblocks
    uint64_t *boff         # nblocks+1 block starts, relative to base
    obd_bcache *cache      # decoded partial blocks (NULL: none)
    obd_presence *presence # cached remote file: which units are there (NULL: all)
    const char *map        # ZFile: the stored blocks mapped (block i at map + boff[i] - boff[0]), or NULL


cdef struct Err:
    int code
    int err_no
    int which
    uint64_t a
    uint64_t b
    uint64_t c
    int nmiss                   # a stack read goes on past cache misses and lists them here
    int mtag[MAX_MISSES]
    uint64_t moff[MAX_MISSES]
    uint64_t mlen[MAX_MISSES]


cdef inline int set_err(Err *err, int code, uint64_t a, uint64_t b, uint64_t c) noexcept nogil:
    err.code = code
    err.err_no = errno
    err.a = a
    err.b = b
    err.c = c
    return -1


cdef int pread_full(int fd, char *dst, uint64_t n, uint64_t off, Err *err) noexcept nogil:
    cdef ssize_t r
    cdef uint64_t done = 0
    while done < n:
        r = pread(fd, dst + done, n - done, off + done)
        if r < 0:
            if errno == EINTR:
                continue
            return set_err(err, E_IO, off + done, n, 0)
        if r == 0:
            return set_err(err, E_SHORT, off, n, done)
        done += r
    return 0


cdef inline int pread_at(int fd, char *dst, uint64_t n, uint64_t base, uint64_t off, Err *err) noexcept nogil:
    """pread_full at file offset base + off, which must not wrap past 2^64."""
    if base + off < base:
        set_err(err, E_IO, <uint64_t>-1, n, 0)
        err.err_no = EINVAL
        return -1
    return pread_full(fd, dst, n, base + off, err)


cdef int decode_block(const BackingC *b, uint64_t blk, const char *src, uint64_t clen,
                      char *out, uint64_t want, Err *err) noexcept nogil:
    """Check one stored block's CRC and decompress it into out (exactly
    `want` bytes)."""
    cdef uint32_t stored, calc
    cdef int r
    cdef size_t zr
    if b.verify:
        clen -= 4
        memcpy(&stored, src + clen, 4)
        calc = obd_crc32c(ZF_SALT, src, clen)
        if stored != calc:
            return set_err(err, E_CRC, blk, stored, calc)
    if b.algo == ALGO_LZ4:
        r = LZ4_decompress_safe(src, out, <int>clen, <int>want)
        if r < 0 or <uint64_t>r != want:
            return set_err(err, E_DECODE, blk, <uint64_t>(<int64_t>r), want)
    else:
        zr = obd_zstd_decompress(out, want, src, clen)
        if ZSTD_isError(zr) or zr != want:
            return set_err(err, E_DECODE, blk, <uint64_t>zr, want)
    return 0


cdef struct DecodeArgs:
    const BackingC *b
    uint64_t blk
    const char *src
    uint64_t clen
    char *out
    uint64_t want
    Err *err


cdef int _decode_trampoline(void *p) noexcept nogil:
    cdef DecodeArgs *a = <DecodeArgs *>p
    return decode_block(a.b, a.blk, a.src, a.clen, a.out, a.want, a.err)


cdef inline int decode_mapped(const BackingC *b, uint64_t blk, char *out, uint64_t want,
                              Err *err) noexcept nogil:
    """decode_block straight from the mapping, with SIGBUS caught (E_MAPFAULT)
    for faults inside the mapping only (one writing `out` still kills).  The
    codec context is made before arming: nothing allocates while armed."""
    cdef DecodeArgs a
    cdef int rc
    if b.algo == ALGO_ZSTD and obd_codec_prepare() != 0:
        return set_err(err, E_NOMEM, 0, 0, 0)
    a.b = b
    a.blk = blk
    a.src = b.map + (b.boff[blk] - b.boff[0])
    a.clen = b.boff[blk + 1] - b.boff[blk]
    a.out = out
    a.want = want
    a.err = err
    rc = obd_guarded(_decode_trampoline, &a, b.map, b.boff[b.nblocks] - b.boff[0])
    if rc == OBD_GUARD_FAULT:
        return set_err(err, E_MAPFAULT, blk, 0, 0)
    return rc


cdef int serve_block(const BackingC *b, uint64_t i, const char *src, char *dst, uint64_t off,
                     uint64_t n, char **scratch, Err *err) noexcept nogil:
    """Decode stored block i (src: its stored bytes; NULL: from the mapping)
    into the part of dst (the read [off, off+n)) it covers.  A block needed
    whole is decoded in place; one needed in part goes through *scratch
    (allocated here) and into the decoded-block cache."""
    cdef uint64_t bs = b.block_size, bstart = i * bs
    cdef uint64_t want = bs if bstart + bs <= b.size else b.size - bstart
    cdef uint64_t lo = off if off > bstart else bstart
    cdef uint64_t hi = off + n if off + n < bstart + want else bstart + want
    cdef char *out
    cdef int rc
    if lo == bstart and hi == bstart + want:
        out = dst + (bstart - off)
    else:
        if scratch[0] == NULL:
            scratch[0] = <char *>malloc(bs)
            if scratch[0] == NULL:
                return set_err(err, E_NOMEM, bs, 0, 0)
        out = scratch[0]
    if src == NULL:
        rc = decode_mapped(b, i, out, want, err)
    else:
        rc = decode_block(b, i, src, b.boff[i + 1] - b.boff[i], out, want, err)
    if rc == 0 and out == scratch[0]:
        memcpy(dst + (lo - off), scratch[0] + (lo - bstart), hi - lo)
        if b.cache != NULL and want == bs:
            obd_bcache_put(b.cache, i, scratch)     # *scratch gets the slot's old buffer
    return rc


cdef int zfile_read(const BackingC *b, char *dst, uint64_t off, uint64_t n, Err *err,
                    bint use_map=True) noexcept nogil:
    cdef uint64_t bs = b.block_size
    cdef uint64_t blk = off / bs, last = (off + n - 1) / bs, stop, i
    cdef uint64_t span, bstart, want, lo, hi
    cdef char stackbuf[STACK_CBUF]      # small reads need no malloc
    cdef char *cbuf = stackbuf
    cdef char *scratch = NULL
    cdef uint64_t ccap = STACK_CBUF
    cdef int rc = 0
    while blk <= last:
        # a block needed only in part may be cached from an earlier read
        bstart = blk * bs
        want = bs if bstart + bs <= b.size else b.size - bstart
        lo = off if off > bstart else bstart
        hi = off + n if off + n < bstart + want else bstart + want
        if b.cache != NULL and not (lo == bstart and hi == bstart + want) and \
                obd_bcache_get(b.cache, blk, dst + (lo - off), lo - bstart, hi - lo):
            blk += 1
            continue
        if use_map and b.map != NULL:
            # a mapped file: decode in place, no system call, no copy
            rc = check_present(b, b.base + b.boff[blk], b.boff[blk + 1] - b.boff[blk], err)
            if rc == 0:
                rc = serve_block(b, blk, NULL, dst, off, n, &scratch, err)
            if rc:
                break
            blk += 1
            continue
        # coalesce blocks into one pread of at most COALESCE_MAX bytes
        stop = blk + 1
        while stop <= last and b.boff[stop + 1] - b.boff[blk] <= COALESCE_MAX:
            stop += 1
        span = b.boff[stop] - b.boff[blk]
        if span > ccap:
            if cbuf != stackbuf:
                free(cbuf)
            cbuf = <char *>malloc(span)
            ccap = span
            if cbuf == NULL:
                rc = set_err(err, E_NOMEM, span, 0, 0)
                break
        rc = check_present(b, b.base + b.boff[blk], span, err)
        if rc == 0:
            rc = pread_at(b.fd, cbuf, span, b.base, b.boff[blk], err)
        if rc:
            break
        for i in range(blk, stop):
            rc = serve_block(b, i, cbuf + (b.boff[i] - b.boff[blk]), dst, off, n, &scratch, err)
            if rc:
                break
        if rc:
            break
        blk = stop
    if cbuf != stackbuf:
        free(cbuf)
    free(scratch)
    return rc


cdef inline int check_present(const BackingC *b, uint64_t foff, uint64_t n, Err *err) noexcept nogil:
    """E_MISS when part of file range [foff, foff+n) is not cached yet."""
    cdef uint64_t mo, ml
    if b.presence != NULL and obd_presence_missing(b.presence, foff, n, &mo, &ml):
        return set_err(err, E_MISS, mo, ml, 0)
    return 0


cdef int backing_read(const BackingC *b, char *dst, uint64_t off, uint64_t n, Err *err) noexcept nogil:
    cdef int rc
    if n == 0:
        return 0
    if off + n > b.size or off + n < off:
        return set_err(err, E_RANGE, off, n, b.size)
    if b.presence == NULL:
        return backing_read_locked(b, dst, off, n, err)
    # a cached remote file: presence check and read under the blob's shared
    # lock, so eviction (exclusive: clear + punch) cannot slip in between
    obd_presence_touch(b.presence)
    obd_presence_rdlock(OBD_PRESENCE_LOCK(b.presence))
    rc = backing_read_locked(b, dst, off, n, err)
    obd_presence_unlock(OBD_PRESENCE_LOCK(b.presence))
    return rc


cdef int backing_read_locked(const BackingC *b, char *dst, uint64_t off, uint64_t n, Err *err) noexcept nogil:
    if b.kind == K_RAW:
        if check_present(b, b.base + off, n, err):
            return -1
        return pread_at(b.fd, dst, n, b.base, off, err)
    if zfile_read(b, dst, off, n, err, True) == 0:
        return 0
    if b.map == NULL or (err.code != E_MAPFAULT and err.code != E_CRC and err.code != E_DECODE):
        return -1
    # The mapping faulted (whole pages past a shrunk file's end, or a failed
    # device) or a block failed its check (the part of the last page past the
    # end reads as zeros): pread says which, and why.
    return zfile_read(b, dst, off, n, err, False)


cdef class Backing:
    """A byte range of an open file that records point into: raw bytes
    (RawBacking) or a ZFile's decompressed view (ZFileBacking).  It does not
    own the descriptor; whoever opened the file closes it."""
    cdef BackingC c
    cdef public str name
    cdef Presence _presence
    cdef public object fetcher      # ensure(off, n) / evict(off, n) for a cached remote file
    cdef void *_mapping
    cdef size_t _maplen

    def attach(self, Presence presence, fetcher):
        """Serve this backing from a cache file: reads of units missing in
        `presence` call fetcher.ensure(file_off, n) and retry; a block that
        fails its CRC is fetcher.evict()ed and refetched."""
        self._presence = presence
        self.fetcher = fetcher
        self.c.presence = &presence.p

    def __dealloc__(self):
        obd_unmap(self._mapping, self._maplen)
        free(self.c.boff)
        obd_bcache_free(self.c.cache)

    @property
    def size(self):
        return self.c.size

    @property
    def fd(self):
        return self.c.fd

    def pread(self, uint64_t offset, uint64_t length):
        """Bytes [offset, offset+length) of the backing (clamped to its size)."""
        cdef Err err
        cdef int rc
        if offset >= self.c.size:
            return b""
        if length > self.c.size - offset:
            length = self.c.size - offset
        if length >= (<uint64_t>1 << 63):     # would be a negative Py_ssize_t (SystemError)
            raise MemoryError(f"{self.name}: cannot read {length} bytes at once")
        out = PyBytes_FromStringAndSize(NULL, length)
        cdef char *p = PyBytes_AS_STRING(out)
        err.which = 0
        err.nmiss = 0
        tries = {}
        files = [self]
        try:
            while True:
                with nogil:
                    rc = backing_read(&self.c, p, offset, length, &err)
                if rc == 0 or not recover(&err, files, tries):
                    break
        finally:
            unpin_all(tries)
        if rc:
            raise_err(&err, files)
        return out


cdef class RawBacking(Backing):
    def __init__(self, int fd, uint64_t base, uint64_t size, str name="<raw>"):
        self.c.kind = K_RAW
        self.c.fd = fd
        self.c.base = base
        self.c.size = size
        self.name = name


cdef class ZFileBacking(Backing):
    """The decompressed view of a ZFile whose jump table is `table` (u32
    stored lengths); blocks start at data_start and must end by data_end
    (both relative to base)."""

    def __init__(self, int fd, uint64_t base, uint64_t data_start, uint64_t data_end, table,
                 uint32_t block_size, int algo, bint verify, uint64_t original_size, str name="<zfile>"):
        cdef Py_buffer view
        cdef const uint32_t *t
        cdef uint64_t i, cnt, bound, pos, need
        self.name = name
        if block_size < 512 or block_size > 65536 or (block_size & (block_size - 1)):
            raise FormatError(name, "block_size", block_size, "must be a power of two from 512 to 65536")
        if algo != ALGO_LZ4 and algo != ALGO_ZSTD:
            raise FormatError(name, "algo", algo, "only 1 (LZ4) and 2 (ZSTD) are supported")
        bound = (<uint64_t>LZ4_compressBound(block_size) if algo == ALGO_LZ4
                 else <uint64_t>ZSTD_compressBound(block_size)) + 4
        PyObject_GetBuffer(table, &view, PyBUF_SIMPLE)
        try:
            cnt = view.len // 4
            need = original_size // block_size + (1 if original_size % block_size else 0)
            if cnt != need:
                raise FormatError(name, "index_size", cnt,
                                  f"{original_size} bytes in {block_size}-byte blocks need "
                                  f"{need} blocks")
            self.c.boff = <uint64_t *>malloc((cnt + 1) * sizeof(uint64_t))
            if self.c.boff == NULL:
                raise MemoryError()
            t = <const uint32_t *>view.buf
            pos = data_start
            for i in range(cnt):
                self.c.boff[i] = pos
                if t[i] <= (4 if verify else 0) or t[i] > bound:
                    raise FormatError(name, f"jump table entry {i}", t[i],
                                      f"stored block length must be in {5 if verify else 1}..{bound}")
                pos += t[i]
            self.c.boff[cnt] = pos
            if pos > data_end or pos < data_start:
                raise FormatError(name, "jump table", pos,
                                  f"blocks end at byte {pos}, past the jump table at {data_end}")
        finally:
            PyBuffer_Release(&view)
        self.c.kind = K_ZFILE
        self.c.fd = fd
        self.c.base = base
        self.c.size = original_size
        self.c.block_size = block_size
        self.c.algo = algo
        self.c.verify = verify
        self.c.nblocks = cnt
        if self.c.cache == NULL:
            self.c.cache = obd_bcache_new(BLOCK_CACHE_SLOTS, block_size)
            if self.c.cache == NULL:
                raise MemoryError()

    def map_blocks(self):
        """Read the stored blocks through a read-only mapping of the file
        instead of pread: a local layer, or a remote blob's cache file (full
        size, holes where nothing is fetched yet; the presence bitmap is
        checked before each block, as for pread).  A fault or a failed block
        check falls back to pread for that read, which reports the cause (and
        a cache file's block is then refetched).  False (reads stay preads)
        without per-block CRCs, when the file is shorter than its blocks, or
        when mmap fails."""
        cdef const char *base
        cdef void *mapping
        cdef size_t maplen
        import os
        if self.c.nblocks == 0 or self.c.map != NULL:
            return self.c.map != NULL
        # Only a file that holds every block, with per-block CRCs (as overlaybd
        # writes them): a mapping reads zeros, not an error, in the last page
        # past the end of a file, and the CRC is what tells those apart.
        if not self.c.verify or os.fstat(self.c.fd).st_size < self.c.base + self.c.boff[self.c.nblocks]:
            return False
        if obd_mapguard_install() != 0:
            return False
        if obd_map(self.c.fd, self.c.base + self.c.boff[0], self.c.boff[self.c.nblocks] - self.c.boff[0],
                   &base, &mapping, &maplen) != 0:
            return False
        self._mapping = mapping
        self._maplen = maplen
        self.c.map = base
        return True

    @property
    def mapped(self):
        return self.c.map != NULL

    @property
    def nblocks(self):
        return self.c.nblocks

    def block_extent(self, uint64_t i):
        """(start, length) in the file, relative to base, of stored block i."""
        if i >= self.c.nblocks:
            raise IndexError(i)
        return self.c.boff[i], self.c.boff[i + 1] - self.c.boff[i]

    def verify_all(self):
        """Check every block's CRC and decompression; raises on the first bad one."""
        cdef Err err
        cdef int rc
        cdef uint64_t off = 0, step = 16 << 20, n
        cdef char *buf = <char *>malloc(step)
        if buf == NULL:
            raise MemoryError()
        err.which = 0
        try:
            while off < self.c.size:
                n = min(step, self.c.size - off)
                with nogil:
                    rc = backing_read(&self.c, buf, off, n, &err)
                if rc:
                    raise_err(&err, [self])
                off += n
        finally:
            free(buf)


def mapguard_counters():
    """{"recovered": SIGBUS faults caught in guarded decodes, "armed_allocs":
    codec allocations refused inside one (always 0 unless a decode arms the
    guard before making its codec context)}, over all threads."""
    return {"recovered": obd_mapguard_recovered(), "armed_allocs": obd_codec_armed_allocs()}


def _decode_mapped_into(ZFileBacking b, uint64_t blk, buf):
    """For tests: decode stored block `blk` of a mapped ZFile into the
    writable buffer `buf` through decode_mapped (the guarded decode reads
    use), with no pread fallback.  0, or the Err code (E_MAPFAULT: 9)."""
    cdef Py_buffer view
    cdef Err err
    cdef int rc
    cdef uint64_t want
    if b.c.map == NULL or blk >= b.c.nblocks:
        raise UsageError(f"{b.name}: not mapped, or no block {blk}")
    want = b.c.block_size if (blk + 1) * b.c.block_size <= b.c.size else b.c.size - blk * b.c.block_size
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    try:
        if <uint64_t>view.len < want:
            raise UsageError(f"buffer of {view.len} bytes, block {blk} decodes to {want}")
        err.code = 0
        with nogil:
            rc = decode_mapped(&b.c, blk, <char *>view.buf, want, &err)
    finally:
        PyBuffer_Release(&view)
    return err.code if rc else 0


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


cdef int raise_err(Err *err, list files) except -1:
    import os
    name = files[err.which].name if 0 <= err.which < len(files) else "<backing>"
    if err.code == E_IO:
        raise ReadError(f"{name}: read at byte {err.a} failed: {os.strerror(err.err_no)}")
    if err.code == E_SHORT:
        raise ReadError(f"{name}: file ends at byte {err.a + err.c} inside a read of {err.b} bytes "
                        f"at byte {err.a} (truncated?)")
    if err.code == E_CRC:
        raise CorruptDataError(name, f"zfile block {err.a} crc", err.b,
                               f"computed crc is 0x{err.c:08x}")
    if err.code == E_DECODE:
        raise CorruptDataError(name, f"zfile block {err.a}", <int64_t>err.b,
                               f"block does not decompress to {err.c} bytes")
    if err.code == E_RANGE:
        raise CorruptDataError(name, "moffset", err.a,
                               f"read of {err.b} bytes runs past the end of the layer data ({err.c} bytes)")
    if err.code == E_MISS:
        raise ReadError(f"{name}: bytes {err.a}..{err.a + err.b} are not in the cache and "
                        f"no fetcher is attached")
    if err.code == E_MAPFAULT:
        raise ReadError(f"{name}: reading zfile block {err.a} through the mapping faulted "
                        f"(SIGBUS: the file shrank or its device failed)")
    if err.code == E_NOMEM:
        raise MemoryError(f"{name}: cannot allocate {err.a} bytes")
    if err.code == E_TAG:
        raise UsageError(f"lower record at sector {err.a} has tag {err.b}, no such file")
    raise ReadError(f"{name}: read failed (code {err.code})")


# ---------------------------------------------------------------- stack
cdef struct Pending:
    int tag
    uint64_t foff
    char *dst
    uint64_t len


cdef class Stack:
    """Read-merge over a stack: `files` top-first (lower tags index it),
    the merged lower Index, and an optional upper (RW) Index whose records
    read from files[-1].  Upper data and zeroed records both shadow the
    lower stack; only holes fall through; a hole everywhere reads as zeros."""
    cdef list files_py
    cdef list retired               # backings replaced while reads may still use them
    cdef BackingC **files
    cdef int nfiles
    cdef Index lower
    cdef Index upper
    cdef int upper_tag
    cdef int lower_tags     # lower tags must be below this (files[tag], not the upper's)

    def __init__(self, list files, Index lower=None, Index upper=None):
        cdef Py_ssize_t i
        cdef Backing b
        if len(files) > 256:
            raise UsageError(f"too many backing files: {len(files)}")
        self.files_py = list(files)
        self.retired = []
        self.files = <BackingC **>malloc(max(1, len(files)) * sizeof(BackingC *))
        if self.files == NULL:
            raise MemoryError()
        for i, f in enumerate(files):
            b = <Backing?>f
            self.files[i] = &b.c
        self.nfiles = len(files)
        self.lower = lower
        self.upper = upper
        self.upper_tag = self.nfiles - 1
        self.lower_tags = self.nfiles - 1 if upper is not None else self.nfiles
        if upper is not None and self.nfiles == 0:
            raise UsageError("an upper index needs its backing file last in `files`")
        if upper is not None and upper is lower:
            raise UsageError("the upper index cannot also be the lower one")
        if lower is not None:
            lf = lower._flat()
            for i in range(lf.n):
                if lf.recs[i].tag >= self.nfiles or (upper is not None and lf.recs[i].tag == self.upper_tag):
                    raise UsageError(f"lower record {i} has tag {lf.recs[i].tag}, no such file")

    def __dealloc__(self):
        free(self.files)

    @property
    def lower(self):
        return self.lower

    @property
    def upper(self):
        return self.upper

    cdef int _flush(self, Pending *p, Err *err) noexcept nogil:
        cdef int rc = 0
        if p.len:
            rc = backing_read(self.files[p.tag], p.dst, p.foff, p.len, err)
            if rc:
                err.which = p.tag
                if err.code == E_MISS and err.nmiss < MAX_MISSES:
                    # note it and go on: every miss of this read is fetched at once
                    err.mtag[err.nmiss] = p.tag
                    err.moff[err.nmiss] = err.a
                    err.mlen[err.nmiss] = err.b
                    err.nmiss += 1
                    rc = 0
        p.len = 0
        return rc

    cdef int _emit(self, const Rec *r, int tag, uint64_t s, uint64_t e, char *dst, uint64_t base,
                   Pending *p, Err *err) noexcept nogil:
        """Serve [s, e) (sectors, inside r) into dst (dst = sector `base`)."""
        cdef char *d = dst + (s - base) * SECTOR
        cdef uint64_t n = (e - s) * SECTOR
        cdef uint64_t foff
        if r.zeroed:
            memset(d, 0, n)
            return 0
        if r.moffset + (s - r.offset) >= (<uint64_t>1 << 55):   # the byte offset would wrap past 2^64
            err.which = tag
            return set_err(err, E_RANGE, <uint64_t>-1, n, self.files[tag].size)
        foff = (r.moffset + (s - r.offset)) * SECTOR
        if p.len and p.tag == tag and p.foff + p.len == foff and p.dst + p.len == d:
            p.len += n
            return 0
        if self._flush(p, err):
            return -1
        p.tag = tag
        p.foff = foff
        p.dst = d
        p.len = n
        return 0

    cdef int _read_lower(self, uint64_t s, uint64_t e, char *dst, uint64_t base,
                         Pending *p, Err *err) noexcept nogil:
        cdef uint64_t pos = s, rs, re
        cdef const Rec *r
        cdef Cur c
        cdef int rc = 0
        cdef bint locked
        if self.lower is None:
            memset(dst + (s - base) * SECTOR, 0, (e - s) * SECTOR)
            return 0
        locked = self.lower.tree != NULL      # a lower that takes writes (tests do that)
        if locked:
            pthread_rwlock_rdlock(&self.lower.lock)
        r = cur_seek(self.lower, s, &c)
        while r != NULL and r.offset < e:
            if r.tag >= self.lower_tags:     # the lower Index changed after __init__
                rc = set_err(err, E_TAG, r.offset, r.tag, 0)
                break
            rs = r.offset if r.offset > pos else pos
            if rs > pos:
                memset(dst + (pos - base) * SECTOR, 0, (rs - pos) * SECTOR)
            re = rend(r) if rend(r) < e else e
            if self._emit(r, r.tag, rs, re, dst, base, p, err):
                rc = -1
                break
            pos = re
            r = cur_next(&c)
        if locked:
            pthread_rwlock_unlock(&self.lower.lock)
        if rc == 0 and pos < e:
            memset(dst + (pos - base) * SECTOR, 0, (e - pos) * SECTOR)
        return rc

    cdef int _read(self, char *dst, uint64_t s, uint64_t e, Err *err) noexcept nogil:
        cdef Pending p
        cdef Cur c
        cdef uint64_t pos = s, rs, re
        cdef const Rec *r
        cdef int rc = 0
        p.len = 0
        if self.upper is None:
            rc = self._read_lower(s, e, dst, s, &p, err)
        else:
            pthread_rwlock_rdlock(&self.upper.lock)
            r = cur_seek(self.upper, s, &c)
            while r != NULL and r.offset < e:
                rs = r.offset if r.offset > pos else pos
                if rs > pos:
                    rc = self._read_lower(pos, rs, dst, s, &p, err)
                    if rc:
                        break
                re = rend(r) if rend(r) < e else e
                rc = self._emit(r, self.upper_tag, rs, re, dst, s, &p, err)
                if rc:
                    break
                pos = re
                r = cur_next(&c)
            if rc == 0 and pos < e:
                rc = self._read_lower(pos, e, dst, s, &p, err)
            pthread_rwlock_unlock(&self.upper.lock)
        if rc == 0:
            rc = self._flush(&p, err)
        if rc == 0 and err.nmiss:
            err.code = E_MISS
            rc = -1
        return rc

    def read_into(self, buf, uint64_t offset):
        """Fill the writable buffer `buf` with the stack's bytes at `offset`.
        offset and len(buf) must be multiples of 512."""
        cdef Py_buffer view
        cdef Err err
        cdef int rc
        tries = {}
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        try:
            if offset % SECTOR or view.len % SECTOR:
                raise UsageError(f"read of {view.len} bytes at {offset} is not 512-byte aligned")
            while True:
                err.which = -1
                err.nmiss = 0
                with nogil:
                    rc = self._read(<char *>view.buf, offset // SECTOR, (offset + view.len) // SECTOR, &err)
                if rc == 0 or not recover(&err, self.files_py, tries):
                    break
        finally:
            unpin_all(tries)
            PyBuffer_Release(&view)
        if rc:
            raise_err(&err, self.files_py)
        return None

    def read(self, uint64_t offset, uint64_t length):
        out = bytearray(length)
        self.read_into(out, offset)
        return bytes(out)

    def replace_file(self, int tag, Backing backing):
        """Serve file `tag` from another backing with the same bytes (a layer
        whose background download finished).  Reads already running keep
        the old backing, which stays alive as long as this stack."""
        if not 0 <= tag < self.nfiles:
            raise UsageError(f"no file with tag {tag}")
        old = self.files_py[tag]
        if (<Backing>old).c.size != backing.c.size:
            raise UsageError(f"replacement for file {tag} has {backing.c.size} bytes, not {(<Backing>old).c.size}")
        self.retired.append(old)
        self.files_py[tag] = backing
        self.files[tag] = &backing.c

    @property
    def backings(self):
        return list(self.files_py)

    def lookup(self, uint64_t offset, uint64_t length):
        """The effective records for [offset, offset+length) in sectors:
        upper records (tag = upper file) with lower ones in their holes."""
        if self.upper is None:
            return self.lower.lookup(offset, length) if self.lower is not None else []
        out = []
        pos = offset
        end = offset + <object>length     # a Python int: must not wrap past 2^64
        for k, r in enumerate(self.upper.lookup(offset, length)):
            if r[0] > pos and self.lower is not None:
                out.extend(self.lower.lookup(pos, r[0] - pos))
            out.append((r[0], r[1], r[2], r[3], self.upper_tag))
            pos = r[0] + r[1]
            if k % SIGNAL_EVERY == SIGNAL_EVERY - 1:
                PyErr_CheckSignals()
        if pos < end and self.lower is not None:
            out.extend(self.lower.lookup(pos, end - pos))
        return out


# ---------------------------------------------------------------- encode
def compress_blocks(int algo, data, uint32_t block_size, bint verify):
    """Compress `data` into consecutive blocks of block_size bytes (the last
    may be shorter), each followed by its salted CRC when verify.  Returns
    (stored bytes, list of stored lengths).  Runs without the GIL, so worker
    threads compress in parallel."""
    cdef Py_buffer view
    cdef uint64_t nblk, i, pos, size, blen
    cdef size_t cap, bound
    cdef char *out
    cdef char *src
    cdef int r
    cdef size_t zr
    cdef uint32_t crc
    cdef uint32_t *lens
    if algo != ALGO_LZ4 and algo != ALGO_ZSTD:
        raise UsageError(f"unknown compression algorithm {algo}")
    if block_size == 0:
        raise UsageError("block_size must be positive")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        size = view.len
        nblk = (size + block_size - 1) // block_size
        bound = (<size_t>LZ4_compressBound(block_size) if algo == ALGO_LZ4
                 else ZSTD_compressBound(block_size)) + 4
        cap = nblk * bound
        out = <char *>malloc(cap if cap else 1)
        lens = <uint32_t *>malloc((nblk if nblk else 1) * sizeof(uint32_t))
        if out == NULL or lens == NULL:
            free(out)
            free(lens)
            raise MemoryError()
        src = <char *>view.buf
        pos = 0
        r = 0
        with nogil:
            for i in range(nblk):
                blen = block_size if (i + 1) * block_size <= size else size - i * block_size
                if algo == ALGO_LZ4:
                    r = LZ4_compress_default(src + i * block_size, out + pos, <int>blen, <int>(bound - 4))
                    if r <= 0:
                        break
                    zr = r
                else:
                    zr = obd_zstd_compress(out + pos, bound - 4, src + i * block_size, blen, ZSTD_LEVEL)
                    if ZSTD_isError(zr):
                        r = -1
                        break
                if verify:
                    crc = obd_crc32c(ZF_SALT, out + pos, zr)
                    memcpy(out + pos + zr, &crc, 4)
                    zr += 4
                lens[i] = <uint32_t>zr
                pos += zr
        if r < 0 or (algo == ALGO_LZ4 and nblk and r == 0):
            free(out)
            free(lens)
            raise UsageError("compression failed")
        result = PyBytes_FromStringAndSize(out, pos)
        lengths = [lens[i] for i in range(nblk)]
        free(out)
        free(lens)
    finally:
        PyBuffer_Release(&view)
    return result, lengths


# ---------------------------------------------------------------- C entry point for the TCMU ring
cdef int stack_read_nogil(void *stack, char *dst, uint64_t offset, uint64_t length) noexcept nogil:
    """Stack.read_into without the GIL or any Python object, for a TCMU worker
    (tcmu_obd/serve/_tcmu.pyx gets it from the STACK_READ capsule).  `stack` is a
    borrowed Stack* the caller keeps alive.  0 when the bytes are in dst;
    -1 when this read needs more (cache misses to fetch, a CRC to heal, an
    error to describe): the caller then calls read_into, which does all that."""
    cdef Err err
    if offset % SECTOR or length % SECTOR:
        return -1
    err.which = -1
    err.nmiss = 0
    return (<Stack>stack)._read(dst, offset // SECTOR, (offset + length) // SECTOR, &err)


STACK_READ = PyCapsule_New(<void *>stack_read_nogil, "tcmu_obd.core._lsmt.stack_read_nogil", NULL)
