"""Index records and lookup for the Cython core (included by _lsmt.pyx):
the 16-byte on-disk record codec, the Index class (a flat sorted array with a
bucket table, or the B+tree of native/rwindex.c once it takes writes, both
behind one rwlock), the cursor that walks either shape, and merge() of a
stack of indexes.

It reads no file and knows no backing: what a record points at is served by
_lsmt_backing.pxi, and reading through a stack of them by _lsmt_stack.pxi.
"""

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


REC_FIELDS = ("offset", "length", "moffset", "zeroed", "tag")


cdef inline bint rec_field_ok(name, v):
    """An integer (anything with __index__) that is not a bool, except that
    the zeroed flag may be a bool."""
    if isinstance(v, bool):
        return name == "zeroed"
    return hasattr(type(v), "__index__")


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
        """From an iterable of (offset, length, moffset, zeroed, tag), kept in
        order.  Each field must be an integer (zeroed may be a bool): a float
        or a bool elsewhere is refused (FormatError naming record and field),
        not truncated."""
        cdef Index idx = Index()
        cdef Rec r
        for rec in records:
            idx._reserve(idx.n + 1)
            offset, length, moffset, zeroed, tag = rec
            for name, v in zip(REC_FIELDS, (offset, length, moffset, zeroed, tag)):
                if not rec_field_ok(name, v):
                    raise FormatError("<records>", f"record {idx.n} {name}", v, "not an integer")
            r.offset, r.length, r.moffset, r.zeroed, r.tag = offset, length, moffset, zeroed, tag
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

    def check_moffset(self, uint64_t lo, uint64_t hi, int tag=-1):
        """-1 when every data record lies in [lo, hi) and every zeroed
        record has lo <= moffset <= hi; else the first bad position.
        tag >= 0: only records with that tag are checked."""
        cdef Index f = self._flat()
        cdef Py_ssize_t i
        cdef Rec *r
        for i in range(f.n):
            r = &f.recs[i]
            if tag >= 0 and r.tag != tag:
                continue
            if r.zeroed:
                if r.moffset < lo or r.moffset > hi:
                    return i
            elif r.moffset < lo or r.moffset >= hi or r.moffset + r.length > hi:
                return i
        return -1

    def check_starts(self, int tag, uint64_t limit):
        """-1 when every data record with this tag starts below `limit`
        (sectors), else the first position of one that does not."""
        cdef Index f = self._flat()
        cdef Py_ssize_t i
        for i in range(f.n):
            if f.recs[i].tag == tag and not f.recs[i].zeroed and f.recs[i].moffset >= limit:
                return i
        return -1

    def normalise_tags(self, int max_tag):
        """overlaybd's warp-file rule: subtract the smallest tag present
        from every tag.  Returns (that smallest tag, the first position
        whose tag is still above max_tag, or -1)."""
        cdef Index f = self._flat()
        cdef Py_ssize_t i, bad = -1
        cdef uint8_t lo = 255
        if f is not self:
            raise UsageError("normalise_tags needs a flat index")
        for i in range(self.n):
            if self.recs[i].tag < lo:
                lo = self.recs[i].tag
        if self.n == 0:
            lo = 0
        for i in range(self.n):
            self.recs[i].tag -= lo
            if bad < 0 and self.recs[i].tag > max_tag:
                bad = i
        return lo, bad

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


def merge(list layers, bases=None):
    """Merge indexes given top-first into one: each layer fills only the
    holes left by the layers above it; tag = position in `layers`.  With
    `bases` (one file number per layer), tag = bases[i] + the record's own
    tag instead: a warp layer's tag-1 records then name its target file."""
    cdef Index acc = Index(), low, nxt
    cdef Py_ssize_t li, i, j, k, nr
    cdef Rec piece, L
    cdef uint64_t pos, e, gend
    cdef int base, maxtag
    cdef bint own_tags = bases is not None
    if len(layers) > 255:
        raise FormatError("<stack>", "layer count", len(layers), "at most 255 read-only layers")
    if bases is not None and len(bases) != len(layers):
        raise UsageError(f"{len(bases)} bases for {len(layers)} layers")
    for li in range(len(layers)):
        low = (<Index?>layers[li])._flat()
        if bases is None:
            base, maxtag = li, 0
        else:
            base = bases[li]
            maxtag = 0
            for j in range(low.n):
                if low.recs[j].tag > maxtag:
                    maxtag = low.recs[j].tag
            if base < 0 or base + maxtag > 255:
                raise FormatError("<stack>", "file number", base + maxtag, "at most 255 read-only files")
        nxt = Index()
        nxt._reserve(acc.n + 2 * low.n + 1)
        nr = acc.n
        i = 0
        for j in range(low.n):
            if j % SIGNAL_EVERY == SIGNAL_EVERY - 1:
                PyErr_CheckSignals()
            L = low.recs[j]
            L.tag = <uint8_t>(base + (L.tag if own_tags else 0))
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
