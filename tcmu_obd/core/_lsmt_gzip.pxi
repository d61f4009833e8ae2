"""The gzip side of the Cython core (included by _lsmt.pyx): GzipBacking,
random reads of a gzip blob's decompressed stream through a "ddgzidx" index
(access points + 32 KiB windows), and GzipScanner, the inflate loop that
finds the access points while it decompresses a blob once (the index writer,
tcmu_obd.format.gzindex, drives it and writes the file).

It does not parse or write index files (tcmu_obd.format.gzindex does; a
GzipBacking takes the access points as plain ints and bytes, and checks them) and it does not fetch: the compressed
bytes are read only through the target Backing's C read, so a cached remote
target reports its misses (E_MISS, in the target's own file coordinates)
and _lsmt_cache.recover() fetches them through the target's fetcher.
zlib is called through our own declarations (native/zlibdecl.h).

Reads: the entry with the greatest de_pos <= offset is the access point; a
raw inflate is primed with its `bits`, given its window as dictionary and
run forward.  Unlike overlaybd, which re-inflates from the access point on
every read, what a read decoded (up to 64 KiB past its end, and 256 KiB
before its offset) stays in a small LRU of slots per backing, and the
inflate state is kept, so a later read further in the same span resumes it
instead of starting again at the access point: a cold random read costs
what overlaybd's does, sequential reads inflate each byte once.
"""

cdef extern from "zlibdecl.h" nogil:
    ctypedef struct obd_z_stream:
        const unsigned char *next_in
        unsigned avail_in
        unsigned char *next_out
        unsigned avail_out
        const char *msg
        int data_type
    int obd_inflate_init2(obd_z_stream *strm, int window_bits)
    int inflate(obd_z_stream *strm, int flush)
    int inflateEnd(obd_z_stream *strm)
    int inflatePrime(obd_z_stream *strm, int bits, int value)
    int inflateSetDictionary(obd_z_stream *strm, const unsigned char *dictionary, unsigned length)
    int Z_OK "OBD_Z_OK"
    int Z_STREAM_END "OBD_Z_STREAM_END"
    int Z_BUF_ERROR "OBD_Z_BUF_ERROR"
    int Z_NO_FLUSH "OBD_Z_NO_FLUSH"
    int Z_FINISH "OBD_Z_FINISH"
    int Z_BLOCK "OBD_Z_BLOCK"

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *, void *)
    int pthread_mutex_destroy(pthread_mutex_t *)
    int pthread_mutex_lock(pthread_mutex_t *)
    int pthread_mutex_unlock(pthread_mutex_t *)

from libc.stdlib cimport calloc
from libc.string cimport memmove

cdef enum:
    GZ_WIN = 32768            # window (dictionary) bytes
    GZ_IN = 65536             # compressed bytes read from the target at once
    GZ_PIECE = 1 << 20        # a miss decodes at most this much past the offset ...
    GZ_STEP = 65536           # ... rounded up to a multiple of this from the access point
    GZ_BEFORE = 262144        # decoded bytes before the offset kept in the cache slot
    GZ_MAX_SLOTS = 64
    GZ_CURSORS = 4            # resumable inflate states kept per backing
    GZ_PEND = 16              # access points a scanner step may emit before it returns
    GZ_OUT = 1 << 20          # decompressed bytes a scanner step returns at most
    # Err.b of an E_INFLATE besides zlib's own (negative) codes
    GZ_R_ENDED = 1            # the deflate stream ended before the index's uncompress_file_size
    GZ_R_TRUNC = 2            # the gzip blob ended inside the deflate stream
    GZ_R_WINDOW = 3           # a stored window did not inflate to 32768 bytes


cdef struct GzPoint:
    uint64_t de
    uint64_t en
    int bits
    uint64_t woff             # the stored window: wins[woff : woff + wlen]
    uint64_t wlen


cdef struct GzSlot:
    int64_t pt                # -1: empty
    uint64_t start
    uint64_t len
    char *buf
    uint64_t stamp


cdef struct GzCursor:
    int64_t pt
    uint64_t next             # uncompressed offset it stands at
    uint64_t in_pos           # next compressed byte to read from the target
    uint64_t stamp
    obd_z_stream strm
    unsigned char *inbuf


cdef struct GzC:
    const BackingC *target
    uint64_t size
    uint64_t npts
    GzPoint *pts
    const unsigned char *wins
    int algo
    int nslots
    uint64_t clock
    pthread_mutex_t lock
    GzSlot slots[GZ_MAX_SLOTS]
    GzCursor *curs[GZ_CURSORS]


cdef inline uint64_t gz_span_end(const GzC *g, uint64_t i) noexcept nogil:
    return g.pts[i + 1].de if i + 1 < g.npts else g.size


cdef uint64_t gz_find(const GzC *g, uint64_t pos) noexcept nogil:
    """The greatest i with pts[i].de <= pos (pts[0].de is 0)."""
    cdef uint64_t lo = 0, hi = g.npts, mid
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if g.pts[mid].de <= pos:
            lo = mid
        else:
            hi = mid
    return lo


cdef void gz_cursor_free(GzCursor *c) noexcept nogil:
    if c != NULL:
        inflateEnd(&c.strm)
        free(c.inbuf)
        free(c)


cdef int gz_window(const GzC *g, uint64_t i, unsigned char *out, Err *err) noexcept nogil:
    """Access point i's 32 KiB dictionary into out."""
    cdef const GzPoint *p = &g.pts[i]
    cdef obd_z_stream s
    cdef int r
    if g.algo == 0:
        memcpy(out, g.wins + p.woff, GZ_WIN)
        return 0
    memset(&s, 0, sizeof(s))
    if obd_inflate_init2(&s, 15) != Z_OK:
        return set_err(err, E_NOMEM, sizeof(s), 0, 0)
    s.next_in = g.wins + p.woff
    s.avail_in = <unsigned>p.wlen
    s.next_out = out
    s.avail_out = GZ_WIN
    r = inflate(&s, Z_FINISH)
    inflateEnd(&s)
    if r != Z_STREAM_END or s.avail_out != 0:
        return set_err(err, E_INFLATE, i, GZ_R_WINDOW, p.woff)
    return 0


cdef GzCursor *gz_cursor_new(const GzC *g, uint64_t i, Err *err) noexcept nogil:
    """A raw inflate standing at access point i."""
    cdef const GzPoint *p = &g.pts[i]
    cdef GzCursor *c = <GzCursor *>calloc(1, sizeof(GzCursor))
    cdef unsigned char byte
    cdef unsigned char *win
    if c == NULL:
        set_err(err, E_NOMEM, sizeof(GzCursor), 0, 0)
        return NULL
    c.inbuf = <unsigned char *>malloc(GZ_IN)
    if c.inbuf == NULL or obd_inflate_init2(&c.strm, -15) != Z_OK:
        free(c.inbuf)
        free(c)
        set_err(err, E_NOMEM, GZ_IN, 0, 0)
        return NULL
    c.pt = i
    c.next = p.de
    c.in_pos = p.en
    if p.bits:
        if backing_read(g.target, <char *>&byte, p.en - 1, 1, err):
            gz_cursor_free(c)
            return NULL
        inflatePrime(&c.strm, p.bits, byte >> (8 - p.bits))
    # the inflate buffer doubles as the window's scratch space (it is empty yet)
    win = c.inbuf
    if gz_window(g, i, win, err):
        gz_cursor_free(c)
        return NULL
    inflateSetDictionary(&c.strm, win, GZ_WIN)
    return c


cdef int gz_inflate(const GzC *g, GzCursor *c, char *out, uint64_t want, Err *err) noexcept nogil:
    """Exactly `want` more decompressed bytes from cursor c into out."""
    cdef int r
    cdef uint64_t n
    cdef unsigned in0, out0
    c.strm.next_out = <unsigned char *>out
    c.strm.avail_out = <unsigned>want
    while c.strm.avail_out:
        if c.strm.avail_in == 0:
            if c.in_pos >= g.target.size:
                return set_err(err, E_INFLATE, c.pt, GZ_R_TRUNC, c.in_pos)
            n = g.target.size - c.in_pos
            if n > GZ_IN:
                n = GZ_IN
            if backing_read(g.target, <char *>c.inbuf, c.in_pos, n, err):
                return -1
            c.in_pos += n
            c.strm.next_in = c.inbuf
            c.strm.avail_in = <unsigned>n
        in0 = c.strm.avail_in
        out0 = c.strm.avail_out
        r = inflate(&c.strm, Z_NO_FLUSH)
        if r == Z_STREAM_END:
            if c.strm.avail_out:
                return set_err(err, E_INFLATE, c.pt, GZ_R_ENDED,
                               c.next + want - c.strm.avail_out)
            break
        if r != Z_OK and r != Z_BUF_ERROR:
            return set_err(err, E_INFLATE, c.pt, <uint64_t>(<int64_t>r), c.in_pos - c.strm.avail_in)
        if in0 == c.strm.avail_in and out0 == c.strm.avail_out and c.strm.avail_in:
            return set_err(err, E_INFLATE, c.pt, <uint64_t>(<int64_t>r), c.in_pos - c.strm.avail_in)
    c.next += want
    return 0


cdef GzCursor *gz_take_cursor(GzC *g, uint64_t i, uint64_t pos) noexcept nogil:
    """The kept inflate state of span i standing furthest at or before pos
    (removed from the table: the caller owns it), or NULL."""
    cdef GzCursor *c = NULL
    cdef int k, best = -1
    pthread_mutex_lock(&g.lock)
    for k in range(GZ_CURSORS):
        if g.curs[k] != NULL and g.curs[k].pt == <int64_t>i and g.curs[k].next <= pos:
            if best < 0 or g.curs[k].next > g.curs[best].next:
                best = k
    if best >= 0:
        c = g.curs[best]
        g.curs[best] = NULL
    pthread_mutex_unlock(&g.lock)
    return c


cdef void gz_keep_cursor(GzC *g, GzCursor *c) noexcept nogil:
    """Keep c (replacing the least recently kept one)."""
    cdef int k, victim = 0
    pthread_mutex_lock(&g.lock)
    g.clock += 1
    c.stamp = g.clock
    for k in range(GZ_CURSORS):
        if g.curs[k] == NULL:
            victim = k
            break
        if g.curs[k].stamp < g.curs[victim].stamp:
            victim = k
    gz_cursor_free(g.curs[victim])
    g.curs[victim] = c
    pthread_mutex_unlock(&g.lock)


cdef int gz_keep_slot(GzC *g, uint64_t i, uint64_t start, uint64_t n, char *buf) noexcept nogil:
    """Cache decoded bytes [start, start+n) of span i (buf is taken over);
    1 when it was kept, 0 when the caller must free buf."""
    cdef int k, victim = 0
    if g.nslots == 0:
        return 0
    pthread_mutex_lock(&g.lock)
    for k in range(g.nslots):
        if g.slots[k].stamp < g.slots[victim].stamp:
            victim = k
    free(g.slots[victim].buf)
    g.clock += 1
    g.slots[victim].pt = i
    g.slots[victim].start = start
    g.slots[victim].len = n
    g.slots[victim].buf = buf
    g.slots[victim].stamp = g.clock
    pthread_mutex_unlock(&g.lock)
    return 1


cdef uint64_t gz_hit(GzC *g, uint64_t i, uint64_t pos, uint64_t end, char *dst) noexcept nogil:
    """Copy the cached bytes from pos on (up to end) into dst: how many."""
    cdef int k
    cdef uint64_t n = 0
    pthread_mutex_lock(&g.lock)
    for k in range(g.nslots):
        if g.slots[k].pt == <int64_t>i and g.slots[k].start <= pos < g.slots[k].start + g.slots[k].len:
            n = g.slots[k].start + g.slots[k].len
            n = (end if end < n else n) - pos
            memcpy(dst, g.slots[k].buf + (pos - g.slots[k].start), n)
            g.clock += 1
            g.slots[k].stamp = g.clock
            break
    pthread_mutex_unlock(&g.lock)
    return n


cdef inline uint64_t gz_fill_end(uint64_t de, uint64_t se, uint64_t pos, uint64_t need) noexcept nogil:
    """Where a decode for the bytes [pos, need) of span [de, se) stops: at
    most GZ_PIECE past pos, rounded up to GZ_STEP from de, within the span.
    The pure-Python twin stops at the same place (same errors)."""
    cdef uint64_t e = need if need < pos + GZ_PIECE else pos + GZ_PIECE
    e = de + (e - de + GZ_STEP - 1) // GZ_STEP * GZ_STEP
    return e if e < se else se


cdef int gz_read(GzC *g, char *dst, uint64_t off, uint64_t n, Err *err) noexcept nogil:
    """Decompressed bytes [off, off+n): E_SHORT (c = bytes served) for a read
    running past the end of the stream, after serving the part inside it.
    A miss resumes a kept inflate state of the span at or before the
    offset, or starts one at the access point, decodes up to gz_fill_end,
    keeps up to GZ_BEFORE bytes before the offset and the rest as a cache
    slot, and keeps the inflate state for the next piece."""
    cdef uint64_t end = off + n, stop, pos = off, i, de, se, fe, bstart, got, skip
    cdef const BackingC *t = g.target
    cdef uint64_t cs, ce
    cdef GzCursor *c
    cdef char *buf
    if end < off:
        return set_err(err, E_RANGE, off, n, g.size)
    stop = end if end < g.size else g.size
    while pos < stop:
        i = gz_find(g, pos)
        de = g.pts[i].de
        se = gz_span_end(g, i)
        got = gz_hit(g, i, pos, stop if stop < se else se, dst + (pos - off))
        if got:
            pos += got
            continue
        fe = gz_fill_end(de, se, pos, stop if stop < se else se)
        c = gz_take_cursor(g, i, pos)
        if c == NULL:
            if t.presence != NULL:
                # ask for the span's compressed bytes at once, not 64 KiB per round trip
                cs = g.pts[i].en - (1 if g.pts[i].bits else 0)
                ce = g.pts[i + 1].en + GZ_IN if i + 1 < g.npts else t.size
                if ce > t.size:
                    ce = t.size
                if ce > cs and check_present(t, t.base + cs, ce - cs, err):
                    return -1
            c = gz_cursor_new(g, i, err)
            if c == NULL:
                return -1
        bstart = pos - GZ_BEFORE if pos - c.next > GZ_BEFORE else c.next
        buf = <char *>malloc(fe - bstart)
        if buf == NULL:
            gz_cursor_free(c)
            return set_err(err, E_NOMEM, fe - bstart, 0, 0)
        while c.next < bstart:
            skip = bstart - c.next
            if skip > fe - bstart:
                skip = fe - bstart
            if gz_inflate(g, c, buf, skip, err):
                gz_cursor_free(c)
                free(buf)
                return -1
        if gz_inflate(g, c, buf, fe - bstart, err):
            gz_cursor_free(c)
            free(buf)
            return -1
        got = (stop if stop < fe else fe) - pos
        memcpy(dst + (pos - off), buf + (pos - bstart), got)
        pos += got
        if not gz_keep_slot(g, i, bstart, fe - bstart, buf):
            free(buf)
        if c.next < se:
            gz_keep_cursor(g, c)
        else:
            gz_cursor_free(c)
    if end > g.size:
        return set_err(err, E_SHORT, off, n, stop - off if stop > off else 0)
    return 0


cdef list gz_check_points(points, windows_len, size, target_size, bint raw_windows, str name):
    """The access points as a list of int 5-tuples, each value checked
    against what gz_read relies on; FormatError(name, "access point I
    FIELD", value, why) otherwise.  The pure-Python twin checks the same
    (tcmu_obd.core.reference.gz)."""
    if type(size) is not int or not 0 <= size < (1 << 63):
        raise FormatError(name, "size", size, "the decompressed size must be an int 0..2**63-1")
    out = []
    prev = 0
    for i, p in enumerate(points):
        try:
            de, en, bits, woff, wlen = p
        except (TypeError, ValueError):
            raise FormatError(name, f"access point {i}", p,
                              "must be (de_pos, en_pos, bits, win_off, win_len)") from None
        for field, v in (("de_pos", de), ("en_pos", en), ("bits", bits), ("win_off", woff), ("win_len", wlen)):
            if type(v) is not int:
                raise FormatError(name, f"access point {i} {field}", v, "must be an int")
        if i == 0 and de != 0:
            raise FormatError(name, "access point 0 de_pos", de, "the first access point is at byte 0")
        if not prev <= de <= size:
            raise FormatError(name, f"access point {i} de_pos", de,
                              f"must be sorted (previous {prev}) and inside the {size}-byte stream")
        if not 0 <= bits <= 7:
            raise FormatError(name, f"access point {i} bits", bits, "must be 0..7")
        if not (1 if bits else 0) <= en <= target_size:
            raise FormatError(name, f"access point {i} en_pos", en,
                              f"outside the {target_size}-byte gzip blob (bits {bits})")
        if not 1 <= wlen < (1 << 32) or (raw_windows and wlen != GZ_WIN):
            raise FormatError(name, f"access point {i} win_len", wlen,
                              f"must be {GZ_WIN} (raw windows)" if raw_windows else "must be 1..2**32-1")
        if not 0 <= woff <= windows_len - wlen:
            raise FormatError(name, f"access point {i} win_off", woff,
                              f"the {wlen}-byte window lies outside the {windows_len} bytes of windows")
        out.append((de, en, bits, woff, wlen))
        prev = de
    if not out:
        raise FormatError(name, "access point 0 de_pos", None, "there must be at least one access point")
    return out


cdef class GzipBacking(Backing):
    """The decompressed stream of a gzip blob, read at random through its
    access points.  `target` is the Backing holding the .gz blob (raw local
    file, or a cached remote one: attach() the target before making this).
    The access points come as plain values (tcmu_obd.format.gzindex parses
    an index file into them): `points`, a sequence of (de_pos, en_pos, bits,
    win_off, win_len) ints in de_pos order, the first at 0; `windows`, the
    bytes holding each point's 32 KiB dictionary at [win_off, win_off +
    win_len), zlib-compressed (or raw, 32768 bytes each, when raw_windows);
    `size`, the decompressed stream's length.  Every value is checked here
    (FormatError naming `name`, the point and the field), so nothing passed
    in makes a read go outside the windows or the blob.
    A read past the end serves the bytes inside the stream and then fails
    with E_SHORT (ReadError), as a RawBacking over a short file does.
    `cache_slots` decoded pieces (at most 1.3 MiB each) are kept; 0 keeps
    none (inflate states are still resumed)."""
    cdef GzC *g
    cdef readonly Backing target
    cdef bytes _wins

    def __init__(self, Backing target, points, windows, size, str name="<gzip>", int cache_slots=8,
                 *, bint raw_windows=False):
        cdef uint64_t i, n
        self.name = name
        wins = windows if type(windows) is bytes else bytes(memoryview(windows))
        pts = gz_check_points(points, len(wins), size, target.c.size, raw_windows, name)
        if not 0 <= cache_slots <= GZ_MAX_SLOTS:
            raise UsageError(f"cache_slots {cache_slots}: must be 0..{GZ_MAX_SLOTS}")
        self.target = target
        self.fetcher = target.fetcher
        self._wins = wins
        n = len(pts)
        self.g = <GzC *>calloc(1, sizeof(GzC))
        if self.g == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.g.lock, NULL)
        self.g.pts = <GzPoint *>malloc(n * sizeof(GzPoint))
        if self.g.pts == NULL:
            raise MemoryError()
        for i in range(n):
            de, en, bits, woff, wlen = pts[i]
            self.g.pts[i].de = de
            self.g.pts[i].en = en
            self.g.pts[i].bits = bits
            self.g.pts[i].woff = woff
            self.g.pts[i].wlen = wlen
        for i in range(GZ_MAX_SLOTS):
            self.g.slots[i].pt = -1
        self.g.npts = n
        self.g.target = &target.c
        self.g.size = size
        self.g.wins = <const unsigned char *>PyBytes_AS_STRING(self._wins)
        self.g.algo = 0 if raw_windows else 1
        self.g.nslots = cache_slots
        self.c.kind = K_GZIP
        self.c.fd = target.c.fd
        self.c.size = size
        self.c.gz = self.g

    def attach(self, Presence presence, fetcher):
        raise UsageError(f"{self.name}: attach the cache to the gzip blob's backing (the target), "
                         f"before making the GzipBacking")

    def __dealloc__(self):
        cdef int k
        if self.g != NULL:
            for k in range(GZ_MAX_SLOTS):
                free(self.g.slots[k].buf)
            for k in range(GZ_CURSORS):
                gz_cursor_free(self.g.curs[k])
            free(self.g.pts)
            pthread_mutex_destroy(&self.g.lock)
            free(self.g)

    @property
    def points(self):
        return self.g.npts


# ---------------------------------------------------------------- the index writer's inflate loop

cdef struct GzCand:
    uint64_t de
    uint64_t en
    int bits


cdef struct GzScan:
    obd_z_stream strm
    int ended
    int zerr
    uint64_t ttin
    uint64_t ttout
    uint64_t span
    uint64_t expected
    int has_last
    GzCand last
    int npend
    GzCand pend[GZ_PEND]
    const unsigned char *out0     # the current step's output buffer (valid during a step)
    unsigned char hist[GZ_WIN]    # the 32 KiB of output before out0 (zeros before the stream)
    unsigned char lastwin[GZ_WIN]
    unsigned char pendwin[GZ_PEND][GZ_WIN]


cdef void gzscan_window(const GzScan *s, unsigned char *dst) noexcept nogil:
    """The 32 KiB before the current output position, oldest first (zeros
    before the first 32 KiB of output): the end of hist + this step's output."""
    cdef uint64_t made = <uint64_t>(s.strm.next_out - s.out0)
    if made >= GZ_WIN:
        memcpy(dst, s.out0 + made - GZ_WIN, GZ_WIN)
    else:
        memcpy(dst, s.hist + made, GZ_WIN - made)
        memcpy(dst + GZ_WIN - made, s.out0, made)


cdef void gzscan_hist(GzScan *s) noexcept nogil:
    """At the end of a step: hist becomes the 32 KiB before the next step's output."""
    cdef uint64_t made = <uint64_t>(s.strm.next_out - s.out0)
    if made >= GZ_WIN:
        memcpy(s.hist, s.out0 + made - GZ_WIN, GZ_WIN)
    elif made:
        memmove(s.hist, s.hist + made, GZ_WIN - made)
        memcpy(s.hist + GZ_WIN - made, s.out0, made)


cdef void gzscan_record(GzScan *s) noexcept nogil:
    """overlaybd's thinning rule: about one access point per `span` output
    bytes, the last block boundary at or before each multiple of span.  A
    candidate's window is copied only where it is kept: into lastwin (it may
    be emitted later) or straight into its pending slot."""
    cdef GzCand c
    c.de = s.ttout
    c.en = s.ttin
    c.bits = s.strm.data_type & 7
    if c.de < s.expected:
        s.last = c
        gzscan_window(s, s.lastwin)
        s.has_last = 1
        return
    if c.de > s.expected:
        if s.has_last:
            s.has_last = 0
            s.pend[s.npend] = s.last
            memcpy(s.pendwin[s.npend], s.lastwin, GZ_WIN)
            s.npend += 1
        s.last = c
        gzscan_window(s, s.lastwin)
        s.has_last = 1
        while s.expected < c.de:
            s.expected += s.span
    if c.de == s.expected:
        s.has_last = 0
        s.pend[s.npend] = c
        gzscan_window(s, s.pendwin[s.npend])
        s.npend += 1
        s.expected += s.span


cdef int gzscan_step(GzScan *s, const unsigned char *inp, uint64_t in_len, unsigned char *out,
                     uint64_t out_cap, uint64_t *used, uint64_t *made) noexcept nogil:
    """inflate(Z_BLOCK) over inp into out until the input is used, the output
    is full, the stream ends or access points are waiting; an access-point
    candidate after every call that stopped at a block boundary other than
    after the last block.  -1 on a zlib error (s.zerr)."""
    cdef unsigned in0, out0
    cdef int r
    cdef bint progress = True
    s.strm.next_in = inp
    s.strm.avail_in = <unsigned>in_len
    s.strm.next_out = out
    s.strm.avail_out = <unsigned>out_cap
    s.out0 = out
    while not s.ended and s.strm.avail_out and s.npend <= GZ_PEND - 2 and (s.strm.avail_in or progress):
        in0 = s.strm.avail_in
        out0 = s.strm.avail_out
        r = inflate(&s.strm, Z_BLOCK)
        s.ttin += in0 - s.strm.avail_in
        s.ttout += out0 - s.strm.avail_out
        progress = in0 != s.strm.avail_in or out0 != s.strm.avail_out
        if r == Z_STREAM_END:
            s.ended = 1
            break
        if r != Z_OK and r != Z_BUF_ERROR:
            s.zerr = r
            gzscan_hist(s)
            used[0] = in_len - s.strm.avail_in
            made[0] = out_cap - s.strm.avail_out
            return -1
        if (s.strm.data_type & 128) and not (s.strm.data_type & 64):
            gzscan_record(s)
        if not progress:
            break
    gzscan_hist(s)
    used[0] = in_len - s.strm.avail_in
    made[0] = out_cap - s.strm.avail_out
    return 0


cdef class GzipScanner:
    """Decompresses the first member of a gzip stream fed in chunks and
    picks its access points as overlaybd's index producer does (every
    deflate block boundary is a candidate; the thinning rule keeps about one
    per `span` output bytes).  step() decompresses; points() hands over the
    chosen points with their raw 32 KiB windows.  Whatever follows the
    first member's end is not decompressed (ended is then True)."""
    cdef GzScan *s
    cdef bint live

    def __init__(self, uint64_t span):
        if span == 0:
            raise UsageError("span must be positive")
        self.s = <GzScan *>calloc(1, sizeof(GzScan))
        if self.s == NULL:
            raise MemoryError()
        if obd_inflate_init2(&self.s.strm, 47) != Z_OK:
            raise MemoryError()
        self.live = True
        self.s.span = span

    def __dealloc__(self):
        if self.s != NULL:
            if self.live:
                inflateEnd(&self.s.strm)
            free(self.s)

    def step(self, data, Py_ssize_t start=0):
        """Inflate from data[start:]: (input bytes used, output bytes); the
        output is at most 1 MiB, and a step may stop early to hand over
        access points.  Raises ValueError("zlib error N: msg") on bad data."""
        out = bytearray(GZ_OUT)
        used, made = self.step_into(data, start, out, 0)
        return used, bytes(memoryview(out)[:made])

    def step_into(self, data, Py_ssize_t start, out, Py_ssize_t out_start=0):
        """step() writing the output into the writable buffer out[out_start:]
        (no allocation; the GIL is released while inflating): (input bytes
        used, output bytes written).  A step may stop early, before the input
        is used or out is full, to hand over access points (points())."""
        cdef Py_buffer view, oview
        cdef uint64_t used = 0, made = 0
        cdef int rc
        cdef uint64_t n, cap
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(out, &oview, PyBUF_WRITABLE)
            try:
                if start < 0 or start > view.len:
                    raise UsageError(f"start {start} outside the {view.len}-byte chunk")
                if out_start < 0 or out_start > oview.len:
                    raise UsageError(f"out_start {out_start} outside the {oview.len}-byte output buffer")
                n = min(<uint64_t>(view.len - start), <uint64_t>1 << 30)
                cap = min(<uint64_t>(oview.len - out_start), <uint64_t>1 << 30)
                with nogil:
                    rc = gzscan_step(self.s, <const unsigned char *>view.buf + start, n,
                                     <unsigned char *>oview.buf + out_start, cap, &used, &made)
            finally:
                PyBuffer_Release(&oview)
        finally:
            PyBuffer_Release(&view)
        if rc:
            msg = self.s.strm.msg.decode("utf-8", "replace") if self.s.strm.msg != NULL else "?"
            raise ValueError(f"zlib error {self.s.zerr}: {msg}")
        return used, made

    def points(self):
        """The access points chosen since the last call: (de_pos, en_pos,
        bits, 32 KiB window) tuples, in order."""
        cdef int k
        out = [(self.s.pend[k].de, self.s.pend[k].en, self.s.pend[k].bits,
                PyBytes_FromStringAndSize(<char *>self.s.pendwin[k], GZ_WIN)) for k in range(self.s.npend)]
        self.s.npend = 0
        return out

    @property
    def ended(self):
        return bool(self.s.ended)

    @property
    def total_in(self):
        """Compressed bytes consumed (gzip header included)."""
        return self.s.ttin

    @property
    def total_out(self):
        return self.s.ttout
