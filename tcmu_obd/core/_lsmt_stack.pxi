"""Read-merge over a stack for the Cython core (included by _lsmt.pyx): the
Stack class (upper RW index over the merged lower index, adjacent pieces of
one file coalesced into one backing read, holes as zeros) and
stack_read_nogil, the C entry point the TCMU ring takes from the
STACK_READ capsule.

It does not build indexes (_lsmt_index.pxi) or decode blocks
(_lsmt_backing.pxi), and it leaves recovery from a failed read to
_lsmt_cache.pxi.
"""

cdef struct Pending:
    int tag
    uint64_t foff
    char *dst
    uint64_t len


cdef class Stack:
    """Read-merge over a stack: `files` top-first (lower tags index it),
    the merged lower Index, and an optional upper (RW) Index whose records
    read from files[-1], or, with upper_files=2 (a TurboOCI warp upper, build
    tools only), tag 0 from files[-2] and tag 1 from files[-1].  Upper data and zeroed records both shadow the
    lower stack; only holes fall through; a hole everywhere reads as zeros."""
    cdef list files_py
    cdef list retired               # backings replaced while reads may still use them
    cdef BackingC **files
    cdef int nfiles
    cdef Index lower
    cdef Index upper
    cdef int upper_tag
    cdef int lower_tags     # lower tags must be below this (files[tag], not the upper's)
    cdef int upper_files    # upper record tag t reads files[upper_tag + t], t < upper_files
    cdef pthread_rwlock_t swap      # a read holds it shared, restack() exclusive

    def __cinit__(self):
        self.files = NULL
        if obd_rwlock_init_wpref(&self.swap) != 0:
            raise MemoryError("cannot initialise the stack lock")

    def __init__(self, list files, Index lower=None, Index upper=None, int upper_files=1):
        self.retired = []
        self._set(files, lower, upper, upper_files)

    cdef _set(self, list files, Index lower, Index upper, int upper_files):
        """Check a file table and its indexes, then make them this stack's
        (the caller holds `swap` exclusively, or no read can run yet)."""
        cdef Py_ssize_t i
        cdef Backing b
        cdef BackingC **table
        if len(files) > 256:
            raise UsageError(f"too many backing files: {len(files)}")
        if upper_files not in (1, 2) or (upper is None and upper_files != 1):
            raise UsageError(f"upper_files {upper_files}: 1, or 2 for a warp upper")
        if upper is not None and len(files) < upper_files:
            raise UsageError("an upper index needs its backing file last in `files`")
        if upper is not None and upper is lower:
            raise UsageError("the upper index cannot also be the lower one")
        lower_tags = len(files) - upper_files if upper is not None else len(files)
        if lower is not None:
            lf = lower._flat()
            for i in range(lf.n):
                if lf.recs[i].tag >= lower_tags:
                    raise UsageError(f"lower record {i} has tag {lf.recs[i].tag}, no such file")
        for f in files:
            b = <Backing?>f
        table = <BackingC **>malloc(max(1, len(files)) * sizeof(BackingC *))
        if table == NULL:
            raise MemoryError()
        for i, f in enumerate(files):
            b = <Backing>f
            table[i] = &b.c
        free(self.files)
        self.files = table
        self.files_py = list(files)
        self.nfiles = len(files)
        self.lower = lower
        self.upper = upper
        self.upper_files = upper_files
        self.upper_tag = self.nfiles - upper_files
        self.lower_tags = lower_tags

    def restack(self, int keep, list files, Index lower=None, Index upper=None, int upper_files=1):
        """Serve a new file table and indexes from now on (a live snapshot,
        tcmu_obd.image.stack.Image.restack): the first `keep` files of the
        current table (as they are then: a replace_file() that ran meanwhile
        stays), then `files`; checked as __init__ checks them.  Reads
        running on the old table finish first (they hold the stack lock
        shared); reads after this returns see the new one.  The previous
        backings stay alive as long as this stack.  A refused table leaves
        the stack as it was."""
        with nogil:
            pthread_rwlock_wrlock(&self.swap)
        try:
            if not 0 <= keep <= self.nfiles:
                raise UsageError(f"keep {keep}: the stack has {self.nfiles} files")
            old = self.files_py
            self._set(old[:keep] + files, lower, upper, upper_files)
            self.retired.extend(old[keep:])
        finally:
            pthread_rwlock_unlock(&self.swap)

    def __dealloc__(self):
        free(self.files)
        pthread_rwlock_destroy(&self.swap)

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
        cdef int rc = 0, ut
        p.len = 0
        pthread_rwlock_rdlock(&self.swap)
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
                ut = r.tag if self.upper_files > 1 else 0     # a plain RW upper ignores tags
                if ut >= self.upper_files:
                    rc = set_err(err, E_TAG, r.offset, r.tag, 0)
                    break
                rc = self._emit(r, self.upper_tag + ut, rs, re, dst, s, &p, err)
                if rc:
                    break
                pos = re
                r = cur_next(&c)
            if rc == 0 and pos < e:
                rc = self._read_lower(pos, e, dst, s, &p, err)
            pthread_rwlock_unlock(&self.upper.lock)
        if rc == 0:
            rc = self._flush(&p, err)
        pthread_rwlock_unlock(&self.swap)
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
        if tries:
            count_recovered(rc, tries)
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
            out.append((r[0], r[1], r[2], r[3], self.upper_tag + (r[4] if self.upper_files > 1 else 0)))
            pos = r[0] + r[1]
            if k % SIGNAL_EVERY == SIGNAL_EVERY - 1:
                PyErr_CheckSignals()
        if pos < end and self.lower is not None:
            out.extend(self.lower.lookup(pos, end - pos))
        return out


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
