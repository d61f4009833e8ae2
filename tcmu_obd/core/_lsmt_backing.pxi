"""Backings and block codec of the Cython core (included by _lsmt.pyx): a
failed read's Err record, pread helpers, ZFile block decode (CRC check,
LZ4/ZSTD) from pread buffers or from a SIGBUS-guarded mapping
(native/mapguard.c), the decoded-block cache, the Backing / RawBacking /
ZFileBacking classes, crc32c() and compress_blocks() (the encode side).

It knows byte ranges of open files, not records or stacks (_lsmt_index.pxi,
_lsmt_stack.pxi), and it does not fetch: a cached remote file's missing bytes
are reported as E_MISS and fetched by _lsmt_cache.pxi.
"""



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

# ---------------------------------------------------------------- backings

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
    void *gz               # GzipBacking: its GzC (_lsmt_gzip.pxi)
    int zero_tail          # a warp layer's target: bytes past `size` read as zeros, not E_RANGE


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
    cdef uint64_t inside
    if n == 0:
        return 0
    if off + n < off:
        return set_err(err, E_RANGE, off, n, b.size)
    if off + n > b.size and b.zero_tail:
        # a warp target (the tar) ends inside the piece: the rest reads as
        # zeros, as overlaybd's warp file zero-fills after a short read
        inside = b.size - off if off < b.size else 0
        memset(dst + inside, 0, n - inside)
        n = inside
        if n == 0:
            return 0
    if b.kind == K_GZIP:        # reads its target through backing_read; E_SHORT past the end
        return gz_read(<GzC *>b.gz, dst, off, n, err)
    if off + n > b.size:
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
    def zero_fill_past_end(self):
        """True for a warp layer's target: reads past `size` give zeros (and
        pread is not clamped) instead of failing."""
        return bool(self.c.zero_tail)

    @zero_fill_past_end.setter
    def zero_fill_past_end(self, bint value):
        self.c.zero_tail = value

    @property
    def fd(self):
        return self.c.fd

    def pread(self, uint64_t offset, uint64_t length):
        """Bytes [offset, offset+length) of the backing (clamped to its size,
        unless zero_fill_past_end: then zeros past it)."""
        cdef Err err
        cdef int rc
        if not self.c.zero_tail:
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
        if tries:
            count_recovered(rc, tries)
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

# ---------------------------------------------------------------- encode
def compress_blocks(int algo, data, uint32_t block_size, bint verify):
    """Compress `data` into consecutive blocks of block_size bytes (the last
    may be shorter), each followed by its salted CRC when verify.  Returns
    (stored bytes, list of stored lengths); empty data gives (b"", []), the
    body of a valid 0-byte ZFile.  block_size: a power of two from 512 to
    65536, what a ZFile reader opens; any other is a UsageError.  Runs without the GIL, so worker
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
    if block_size < 512 or block_size > 65536 or (block_size & (block_size - 1)):
        # what a ZFile reader opens (ZFileBacking): never write what cannot be read
        raise UsageError(f"ZFile block_size {block_size} is not a power of two from 512 to 65536")
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
