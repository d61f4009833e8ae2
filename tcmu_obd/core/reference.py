"""Pure-Python twin of the Cython read core tcmu_obd.core._lsmt, with the same API.

It is the model the fast path is checked against: the differential tests
(tests/test_reference_differential.py) and the fuzzer (fuzz/fuzz_core_diff.py)
run both modules on the same inputs and require the same results, or the same
exception class with the same field names.  tcmu_obd.core also selects it when
TCMU_OBD_PURE=1 (debugging, or a machine where the extension did not build).
It is written to be read: plain lists of tuples, bisect, os.preadv, and the
lz4 / zstandard / crc32c packages.  It is not the fast path: it holds the GIL,
copies, and is one to three orders of magnitude slower; nothing should depend
on its speed.  Records are (offset, length, moffset, zeroed, tag) tuples in
512-byte sectors, exactly as _lsmt.Index.record() returns them.

Where the answer depends on machinery rather than on the format, it copies
that machinery so the two agree exactly: C integer argument conversion
(OverflowError/TypeError), the coalescing of adjacent reads (it decides which
error a failing read reports), and the order of validation checks.  It has no
block cache: _lsmt serves partial ZFile blocks it decoded before from memory
and skips their bytes, so for a truncated ZFile the span named in a ReadError
("inside a read of N bytes at byte X") may differ.  Two more
things are outside the contract and may differ: results of lookups, inserts
and merges on an Index that is not sorted and non-overlapping (check_sorted()
!= -1; layer code rejects such indexes before using them), and the `value`
of a CorruptDataError for an undecodable block (the C core reports the
codec's return code, which a Python binding does not expose).  Compressed
bytes may differ too: python-lz4 compresses through the streaming API and
the zstandard wheel bundles its own libzstd, so only the round trip is the
same (see compress_blocks).
"""

import bisect
import operator
import os
import struct
import threading
import time
import errno as _errno

import lz4.block
import zstandard

from tcmu_obd.errors import CorruptDataError, FormatError, ReadError, UsageError

try:                                 # the package does the CRC in C; the table loop below is the fallback
    import crc32c as _crc32c_pkg
except ImportError:                  # pragma: no cover - depends on the environment
    _crc32c_pkg = None

__all__ = ["SALT", "CRC_HW", "crc32c", "Index", "merge", "Backing", "RawBacking",
           "ZFileBacking", "Stack", "compress_blocks"]

# ---------------------------------------------------------------- constants
INVALID_OFFSET = (1 << 50) - 1       # offset of a padding record; also the largest record end
MAX_LENGTH = (1 << 14) - 1           # sectors a record can hold
MAX_MOFFSET = (1 << 55) - 1
SECTOR = 512
MAX_INDEX = 128000000                # records in one Index
SALT = 100007                        # seed of a ZFile block's CRC
ALGO_LZ4 = 1
ALGO_ZSTD = 2
ZSTD_LEVEL = 3
COALESCE_MAX = 1 << 20               # largest single pread of compressed bytes
VERIFY_STEP = 16 << 20               # verify_all decodes this many bytes per step
LZ4_MAX_INPUT_SIZE = 0x7E000000
U8, U32, U64 = (1 << 8) - 1, (1 << 32) - 1, (1 << 64) - 1

CRC_HW = bool(_crc32c_pkg is not None and getattr(_crc32c_pkg, "hardware_based", False))

# error codes of a failed backing read (the C core's Err.code)
E_IO, E_SHORT, E_CRC, E_DECODE, E_RANGE, E_NOMEM, E_TAG, E_MISS = 1, 2, 3, 4, 5, 6, 7, 8
MAX_CRC_RETRIES = 2      # evict-and-refetch rounds per cached block that fails its check
MAX_MISS_ROUNDS = 64     # fetch rounds one read may need (misses evicted again before use)


# ---------------------------------------------------------------- argument conversion
def _cint(v, bits, signed=False, what=None):
    """Convert v the way Cython converts an argument to a C integer: __index__,
    else __int__ (so floats truncate), else TypeError; OverflowError when the
    value does not fit."""
    t = type(v)
    if hasattr(t, "__index__"):
        n = operator.index(v)
    elif hasattr(t, "__int__"):
        n = int(v)
    else:
        raise TypeError("an integer is required")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if n < lo:
        raise OverflowError(f"can't convert negative value to {what or 'uint%d_t' % bits}"
                            if not signed else f"value too small to convert to {what or 'int'}")
    if n > hi:
        raise OverflowError(f"value too large to convert to {what or ('int' if signed else 'uint%d_t' % bits)}")
    return n


def _u64(v):
    return _cint(v, 64)


def _u32(v):
    return _cint(v, 32)


def _u8(v):
    return _cint(v, 8)


def _int(v):
    return _cint(v, 32, signed=True, what="int")


def _ssize(v):
    """A Py_ssize_t argument: __index__ only."""
    n = operator.index(v)
    if not -(1 << 63) <= n < (1 << 63):
        raise OverflowError("Python int too large to convert to C ssize_t")
    return n


def _name(v, arg="name"):
    if v is not None and type(v) is not str:
        raise TypeError(f"Argument '{arg}' has incorrect type (expected str, got {type(v).__name__})")
    return v


def _typed(v, cls, arg, none_ok=True):
    if v is None and none_ok:
        return v
    if not isinstance(v, cls):
        raise TypeError(f"Argument '{arg}' has incorrect type (expected {cls.__name__}, "
                        f"got {type(v).__name__})")
    return v


def _rbuf(data):
    """A flat read-only byte view of a C-contiguous buffer (PyBUF_SIMPLE)."""
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def _wbuf(data):
    """A flat writable byte view (PyBUF_WRITABLE)."""
    mv = memoryview(data)
    if mv.readonly:
        raise BufferError("Object is not writable.")
    if not mv.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


# ---------------------------------------------------------------- crc32c
def _make_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_CRC_TABLE = _make_table()


def _crc32c_table(seed, data):
    """Raw CRC32C: reflected Castagnoli polynomial, no inversions."""
    crc = seed
    t = _CRC_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data, seed=0):
    """overlaybd's raw CRC32C of a bytes-like object, from `seed`."""
    seed = _u32(seed)
    mv = _rbuf(data)
    if _crc32c_pkg is not None:
        # the package computes the standard CRC (inverted in and out)
        return ~_crc32c_pkg.crc32c(mv, value=~seed & U32) & U32
    return _crc32c_table(seed, mv)


# ---------------------------------------------------------------- records
def _decode(w0, w1):
    return (w0 & INVALID_OFFSET, w0 >> 50, w1 & MAX_MOFFSET, (w1 >> 55) & 1, w1 >> 56)


def _encode(r):
    offset, length, moffset, zeroed, tag = r
    w0 = ((offset & INVALID_OFFSET) | (length << 50)) & U64
    w1 = ((moffset & MAX_MOFFSET) | (zeroed << 55) | (tag << 56)) & U64
    return struct.pack("<QQ", w0, w1)


def _end(r):
    return r[0] + r[1]


def _room(want):
    if want > MAX_INDEX:
        raise FormatError("<index>", "record count", want, f"more than {MAX_INDEX} records")


def _trim_front(r, start):
    """r without its sectors before `start` (moffset advances unless zeroed)."""
    cut = start - r[0]
    return (start, r[1] - cut, r[2] if r[3] else r[2] + cut, r[3], r[4])


class Index:
    """A sorted, non-overlapping list of records (see _lsmt.Index).

    Built from raw on-disk bytes (from_raw), by replaying an RW log (replay /
    insert: the newer record wins), or by merge().  find() is a bisect over
    the record ends; build_search() has nothing to build.
    """

    __slots__ = ("_recs", "_ends", "_lock", "_tree")

    def __init__(self):
        self._recs = []          # (offset, length, moffset, zeroed, tag)
        self._ends = None        # cached record ends for bisect; None = stale
        self._lock = threading.Lock()   # an insert against a Stack reading this as its upper
        self._tree = False       # _lsmt keeps a written index in a B+tree; here only the flag

    # -------------------------------------------------------- construction
    @staticmethod
    def from_raw(data, keep_tags=False):
        """Records from on-disk bytes (16 each), invalid ones dropped, in
        file order; tags are forced to 0 unless keep_tags."""
        keep_tags = bool(keep_tags)
        mv = _rbuf(data)
        cnt = len(mv) // 16
        _room(cnt)
        idx = Index()
        for w0, w1 in struct.iter_unpack("<QQ", mv[:cnt * 16]):
            r = _decode(w0, w1)
            if r[0] == INVALID_OFFSET:
                continue
            idx._recs.append(r if keep_tags else r[:4] + (0,))
        return idx

    @staticmethod
    def from_records(records):
        """From an iterable of (offset, length, moffset, zeroed, tag), kept in order."""
        idx = Index()
        for rec in records:
            _room(len(idx._recs) + 1)
            offset, length, moffset, zeroed, tag = rec
            idx._recs.append((_u64(offset), _u32(length), _u64(moffset), _u8(zeroed), _u8(tag)))
        return idx

    def replay(self, data):
        """Apply an RW index log in file order: invalid and zero-length
        records skipped, tags forced to 0, each newer record wins."""
        mv = _rbuf(data)
        cnt = len(mv) // 16
        self._to_tree()
        for w0, w1 in struct.iter_unpack("<QQ", mv[:cnt * 16]):
            offset, length, moffset, zeroed, _tag = _decode(w0, w1)
            if offset == INVALID_OFFSET or length == 0:
                continue
            self._insert(offset, length, moffset, zeroed, 0)

    def insert(self, offset, length, moffset, zeroed=False, tag=0):
        """Insert one record; whatever it overlaps is cut away (newer wins)."""
        offset, length, moffset = _u64(offset), _u32(length), _u64(moffset)
        zeroed, tag = int(bool(zeroed)), _u8(tag)
        if length == 0:
            return
        if length > MAX_LENGTH or offset + length > INVALID_OFFSET or moffset > MAX_MOFFSET:
            raise UsageError(f"record out of range: offset={offset} length={length} moffset={moffset}")
        self._insert(offset, length, moffset, zeroed, tag)

    @property
    def is_tree(self):
        """True once insert() or replay() ran (where _lsmt switches to its B+tree)."""
        return self._tree

    def probe_writer_preference(self):
        """_lsmt's lock probe: a plain mutex never lets a reader past a
        waiting writer."""
        return 1

    def check_tree(self):
        """_lsmt's B+tree self-check; a list has no structure to check."""
        return 0

    def _to_tree(self):
        """Where _lsmt moves the records into its B+tree: zero-length records
        (from_records keeps them) do not go along."""
        if not self._tree:
            with self._lock:
                self._recs = [r for r in self._recs if r[1]]
                self._ends = None
                self._tree = True

    def _insert(self, off, length, moff, zeroed, tag):
        self._to_tree()
        with self._lock:
            self._insert_locked(off, length, moff, zeroed, tag)

    def _insert_locked(self, off, length, moff, zeroed, tag):
        _room(len(self._recs) + 2)
        recs = self._recs
        end = off + length
        i = self._first_end_after(off)
        j = i
        while j < len(recs) and recs[j][0] < end:
            j += 1
        # recs[i:j] overlap [off, end): keep the parts outside it
        repl = []
        if i < j and recs[i][0] < off:
            h = recs[i]
            repl.append((h[0], off - h[0], h[2], h[3], h[4]))
        repl.append((off, length, moff, zeroed, tag))
        if i < j and _end(recs[j - 1]) > end:
            repl.append(_trim_front(recs[j - 1], end))
        recs[i:j] = repl
        self._ends = None

    # -------------------------------------------------------- search
    def build_search(self):
        """Nothing to build: find() bisects the record ends."""
        self._ends = None

    def _first_end_after(self, x):
        if self._ends is None:
            self._ends = [_end(r) for r in self._recs]
        return bisect.bisect_right(self._ends, x)

    def find(self, x):
        """Position of the first record whose end > x (len(self) if none)."""
        return self._first_end_after(_u64(x))

    def bench_find(self, keys):
        """Look up every u64 key in `keys` (a buffer); returns (checksum, seconds)."""
        mv = _rbuf(keys)
        cnt = len(mv) // 8
        ks = [k for (k,) in struct.iter_unpack("=Q", mv[:cnt * 8])]
        t0 = time.perf_counter()
        acc = 0
        for k in ks:
            acc += self._first_end_after(k)
        return acc & U64, time.perf_counter() - t0

    # -------------------------------------------------------- inspection
    def __len__(self):
        return len(self._recs)

    def record(self, i):
        i = _ssize(i)
        if i < 0 or i >= len(self._recs):
            raise IndexError(i)
        return self._recs[i]

    def records(self):
        return list(self._recs)

    def check_sorted(self):
        """-1 when sorted and non-overlapping, else the position of the
        first record that starts before its predecessor ends."""
        for i in range(1, len(self._recs)):
            if self._recs[i][0] < _end(self._recs[i - 1]):
                return i
        return -1

    def check_moffset(self, lo, hi):
        """-1 when every data record lies in [lo, hi) and every zeroed
        record has lo <= moffset <= hi; else the first bad position."""
        lo, hi = _u64(lo), _u64(hi)
        for i, (_off, length, moffset, zeroed, _tag) in enumerate(self._recs):
            if zeroed:
                if moffset < lo or moffset > hi:
                    return i
            elif moffset < lo or moffset >= hi or moffset + length > hi:
                return i
        return -1

    def data_sectors(self):
        """Sectors held by non-zeroed records (fstat's st_blocks)."""
        return sum(r[1] for r in self._recs if not r[3]) & U64

    def dump(self, pad_to=1):
        """On-disk bytes of the records (tags kept), padded with invalid
        records to a multiple of pad_to records."""
        pad_to = _ssize(pad_to)
        total = len(self._recs)
        if pad_to > 1 and total % pad_to:
            total += pad_to - total % pad_to
        pad = _encode((INVALID_OFFSET, 0, 0, 0, 0))
        return b"".join(_encode(r) for r in self._recs) + pad * (total - len(self._recs))

    def lookup(self, offset, length):
        """Records overlapping [offset, offset+length) in sectors, the first
        and last trimmed to it (moffset advanced unless zeroed)."""
        offset, length = _u64(offset), _u64(length)
        end = offset + length
        out = []
        i = self._first_end_after(offset)
        while i < len(self._recs) and self._recs[i][0] < end:
            r = self._recs[i]
            if r[0] < offset:
                r = _trim_front(r, offset)
            if _end(r) > end:
                r = (r[0], end - r[0], r[2], r[3], r[4])
            out.append(r)
            i += 1
        return out


def merge(layers):
    """Merge indexes given top-first into one: each layer fills only the
    holes left by the layers above it; tag = position in `layers`."""
    if type(layers) is not list:
        raise TypeError(f"Argument 'layers' has incorrect type (expected list, got {type(layers).__name__})")
    if len(layers) > 255:
        raise FormatError("<stack>", "layer count", len(layers), "at most 255 read-only layers")
    acc = []                                    # merged so far: sorted, non-overlapping
    for li in range(len(layers)):
        low = layers[li]
        if not isinstance(low, Index):
            raise TypeError(f"Cannot convert {type(low).__name__} to tcmu_obd.core.reference.Index")
        _room(len(acc) + 2 * len(low._recs) + 1)
        ends = [_end(a) for a in acc]
        pieces = []
        for rec in low._recs:
            start, e = rec[0], _end(rec)
            k = bisect.bisect_right(ends, start)   # first upper record ending after start
            pos = start
            while pos < e:                         # walk the holes of acc inside [start, e)
                if k < len(acc) and acc[k][0] <= pos:
                    pos = max(pos, ends[k])
                    k += 1
                    continue
                gend = min(e, acc[k][0]) if k < len(acc) else e
                pieces.append((pos, gend - pos, rec[2] if rec[3] else rec[2] + (pos - start),
                               rec[3], li))
                pos = gend
        acc = sorted(acc + pieces, key=lambda r: r[0])
        if len(acc) > MAX_INDEX:                # the C core fails on the push past the limit
            _room(MAX_INDEX + 1)
    out = Index()
    out._recs = acc
    return out


# ---------------------------------------------------------------- backings
_use_clock = 0
_clock_lock = threading.Lock()


class Presence:
    """Which `unit`-sized pieces of a cached file hold data."""

    def __init__(self, size, unit):
        size, unit = _u64(size), _u64(unit)
        if unit < 512 or unit & (unit - 1):
            raise UsageError(f"presence unit {unit}: must be a power of two >= 512")
        self._unit = unit
        self._size = size
        self._n = -(-size // unit)
        self._bits = bytearray(self._n)
        self._lock = threading.RLock()
        self.touch()

    @property
    def unit(self):
        return self._unit

    def _units(self, offset, length, whole):
        end = min(offset + length, self._size)
        if length == 0 or offset >= self._size:
            return range(0)
        if whole:
            first = -(-offset // self._unit)
            last = self._n if end == self._size else end // self._unit
        else:
            first, last = offset // self._unit, -(-end // self._unit)
        return range(first, last)

    def set(self, offset, length):
        with self._lock:
            for u in self._units(offset, length, True):
                self._bits[u] = 1

    def clear(self, offset, length):
        with self._lock:
            for u in self._units(offset, length, False):
                self._bits[u] = 0

    def _first_missing(self, offset, length):
        """(offset, length) from the first to the last missing unit, or None."""
        miss = [u for u in self._units(offset, length, False) if not self._bits[u]]
        if not miss:
            return None
        lo = miss[0] * self._unit
        return lo, min((miss[-1] + 1) * self._unit, self._size) - lo

    def has(self, offset, length):
        return self._first_missing(offset, length) is None

    def count(self, offset, length):
        return sum(min((u + 1) * self._unit, self._size) - u * self._unit
                   for u in self._units(offset, length, False) if self._bits[u])

    def touch(self):
        global _use_clock
        with _clock_lock:
            _use_clock += 1
            self._used = _use_clock

    @property
    def last_used(self):
        return self._used

    def evict(self, fd, offset, length):
        with self._lock:
            units = self._units(offset, length, False)
            freed = self.count(offset, length)
            for u in units:
                self._bits[u] = 0
            if fd < 0 or not units:
                return freed, 0
            lo, hi = units.start * self._unit, min(units.stop * self._unit, self._size)
            try:
                from tcmu_obd.image.rw import punch_hole
                punch_hole(fd, lo, hi - lo)
            except OSError as e:
                return freed, e.errno
            return freed, 0

    def pread(self, fd, offset, length):
        if length > self._size or offset > self._size - length:
            raise UsageError(f"read of {length} bytes at {offset} is past the blob's {self._size} bytes")
        with self._lock:
            if not self.has(offset, length):
                return None
            out = os.pread(fd, length, offset)
        if len(out) != length:
            raise OSError(_errno.EIO, os.strerror(_errno.EIO))
        return out

    def store(self, fd, data, offset):
        if len(data) > self._size or offset > self._size - len(data):
            raise UsageError(f"write of {len(data)} bytes at {offset} is past the blob's {self._size} bytes")
        with self._lock:
            view = memoryview(data)
            pos = offset
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
            for u in self._units(offset, len(data), True):
                self._bits[u] = 1

    def bitmap(self):
        out = bytearray((self._n + 7) // 8)
        for u in range(self._n):
            if self._bits[u]:
                out[u >> 3] |= 1 << (u & 7)
        return bytes(out)

    def set_bitmap(self, bits):
        if len(bits) != (self._n + 7) // 8:
            raise UsageError(f"bitmap of {len(bits)} bytes for {self._n} units")
        with self._lock:
            for u in range(self._n):
                if (bits[u >> 3] >> (u & 7)) & 1:
                    self._bits[u] = 1

    def missing(self, offset, length):
        out = []
        for u in self._units(offset, length, False):
            if not self._bits[u]:
                lo, hi = u * self._unit, min((u + 1) * self._unit, self._size)
                if out and out[-1][0] + out[-1][1] == lo:
                    out[-1] = (out[-1][0], out[-1][1] + hi - lo)
                else:
                    out.append((lo, hi - lo))
        return out


def _check_present(backing, foff, n):
    if backing._presence is not None:
        miss = backing._presence._first_missing(foff, n)
        if miss is not None:
            raise _Fail(E_MISS, miss[0], miss[1])


def fetch_all(jobs):
    """Run fetcher.ensure(off, n) for every job (one after another here)."""
    for fetcher, off, n in jobs:
        fetcher.ensure(off, n)


def _recover(err, files, tries):
    """As _lsmt.recover: fetch what the cache lacks or evict a bad block;
    True means read again.  `tries` counts refetches per (file, block) and
    fetch rounds per read call."""
    if err.code == E_MISS:
        tries["miss"] = tries.get("miss", 0) + 1
        if tries["miss"] > MAX_MISS_ROUNDS:
            name = files[err.which].name if 0 <= err.which < len(files) else "<backing>"
            raise ReadError(f"{name}: bytes {err.a}..{err.a + err.b} were evicted again before the read "
                            f"could use them, {MAX_MISS_ROUNDS} times (cache too small for this read?)")
    if not 0 <= err.which < len(files):
        return False
    b = files[err.which]
    if b.fetcher is None:
        return False
    if err.code == E_MISS:
        pin = getattr(b.fetcher, "pin", None)
        if pin is not None:
            tries.setdefault("pins", []).append((b.fetcher, pin(err.a, err.b)))
        b.fetcher.ensure(err.a, err.b)
        return True
    key = (err.which, err.a)
    if err.code in (E_CRC, E_DECODE) and isinstance(b, ZFileBacking) and err.a < b.nblocks \
            and tries.get(key, 0) < MAX_CRC_RETRIES:
        tries[key] = tries.get(key, 0) + 1
        start, length = b.block_extent(err.a)
        b.fetcher.evict(b._base + start, length)
        return True
    return False


def _unpin_all(tries):
    for f, token in tries.pop("pins", ()):
        f.unpin(token)


class _Fail(Exception):
    """A failed backing read, as the C core's Err struct."""

    def __init__(self, code, a=0, b=0, c=0, err_no=0):
        super().__init__(code)
        self.code, self.a, self.b, self.c, self.err_no = code, a, b, c, err_no
        self.which = -1


def _raise(err, files):
    """Turn a _Fail into the package's exception, as _lsmt.raise_err does."""
    name = files[err.which].name if 0 <= err.which < len(files) else "<backing>"
    if err.code == E_IO:
        raise ReadError(f"{name}: read at byte {err.a} failed: {os.strerror(err.err_no)}")
    if err.code == E_SHORT:
        raise ReadError(f"{name}: file ends at byte {err.a + err.c} inside a read of {err.b} bytes "
                        f"at byte {err.a} (truncated?)")
    if err.code == E_CRC:
        raise CorruptDataError(name, f"zfile block {err.a} crc", err.b, f"computed crc is 0x{err.c:08x}")
    if err.code == E_DECODE:
        raise CorruptDataError(name, f"zfile block {err.a}", err.b,
                               f"block does not decompress to {err.c} bytes")
    if err.code == E_RANGE:
        raise CorruptDataError(name, "moffset", err.a,
                               f"read of {err.b} bytes runs past the end of the layer data ({err.c} bytes)")
    if err.code == E_MISS:
        raise ReadError(f"{name}: bytes {err.a}..{err.a + err.b} are not in the cache and "
                        f"no fetcher is attached")
    if err.code == E_TAG:
        raise UsageError(f"lower record at sector {err.a} has tag {err.b}, no such file")
    raise ReadError(f"{name}: read failed (code {err.code})")


def _pread_into(fd, dst, off):
    """Fill the byte view dst from fd at off; short files and errors fail."""
    n = len(dst)
    done = 0
    while done < n:
        try:
            r = os.preadv(fd, [dst[done:]], off + done)
        except OverflowError:                    # offset beyond off_t (or 2^64): EINVAL
            raise _Fail(E_IO, min(off + done, U64), n, 0, _errno.EINVAL) from None
        except OSError as e:
            raise _Fail(E_IO, off + done, n, 0, e.errno) from None
        if r == 0:
            raise _Fail(E_SHORT, off, n, done)
        done += r


class Backing:
    """A byte range of an open file that records point into: raw bytes
    (RawBacking) or a ZFile's decompressed view (ZFileBacking).  It does not
    own the descriptor; whoever opened the file closes it."""

    def __init__(self):
        self._fd = 0
        self._base = 0
        self._size = 0
        self._name = None

    _presence = None          # class defaults: subclasses set their own fields only
    fetcher = None

    def attach(self, presence, fetcher):
        """Serve this backing from a cache file (see _lsmt.Backing.attach)."""
        self._presence = _typed(presence, Presence, "presence", none_ok=False)
        self.fetcher = fetcher

    @property
    def name(self):
        return self._name

    @name.setter
    def name(self, value):               # a str or None, like the C core's `public str name`
        self._name = _name(value)

    @property
    def size(self):
        return self._size

    @property
    def fd(self):
        return self._fd

    def _readinto(self, dst, off):
        """Bytes [off, off+len(dst)) into dst; must lie inside the backing."""
        n = len(dst)
        if n == 0:
            return
        if off + n > self._size:
            raise _Fail(E_RANGE, off, n, self._size)
        if self._presence is not None:
            self._presence.touch()
        self._read_inside(dst, off)

    def _read_inside(self, dst, off):
        raise _Fail(E_RANGE, off, len(dst), self._size)   # a bare Backing holds nothing

    def pread(self, offset, length):
        """Bytes [offset, offset+length) of the backing (clamped to its size)."""
        offset, length = _u64(offset), _u64(length)
        if offset >= self._size:
            return b""
        length = min(length, self._size - offset)
        if length >= 1 << 63:
            raise MemoryError(f"{self.name}: cannot read {length} bytes at once")
        out = bytearray(length)
        tries = {}
        try:
            while True:
                try:
                    self._readinto(memoryview(out), offset)
                    break
                except _Fail as err:
                    err.which = 0
                    if not _recover(err, [self], tries):
                        _raise(err, [self])
        finally:
            _unpin_all(tries)
        return bytes(out)


class RawBacking(Backing):
    def __init__(self, fd, base, size, name="<raw>"):
        fd, base, size, name = _int(fd), _u64(base), _u64(size), _name(name)
        self._fd = fd
        self._base = base
        self._size = size
        self.name = name

    def _read_inside(self, dst, off):
        _check_present(self, self._base + off, len(dst))
        _pread_into(self._fd, dst, self._base + off)


def _lz4_bound(n):
    return 0 if n > LZ4_MAX_INPUT_SIZE else n + n // 255 + 16


def _zstd_bound(n):
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0)


def _zstd_decompress(src, want):
    """ZSTD_decompress semantics: every frame in src (skippable ones too),
    nothing left over; None when that fails or yields more than `want`."""
    out = bytearray()
    rest = bytes(src)
    while rest:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        try:
            out += dobj.decompress(rest)
        except zstandard.ZstdError:
            return None
        if not dobj.eof or len(out) > want:
            return None
        rest = dobj.unused_data
    return bytes(out)


class ZFileBacking(Backing):
    """The decompressed view of a ZFile whose jump table is `table` (u32
    stored lengths); blocks start at data_start and must end by data_end
    (both relative to base)."""

    def __init__(self, fd, base, data_start, data_end, table, block_size, algo, verify,
                 original_size, name="<zfile>"):
        fd, base, data_start, data_end = _int(fd), _u64(base), _u64(data_start), _u64(data_end)
        block_size, algo, verify = _u32(block_size), _int(algo), bool(verify)
        original_size, name = _u64(original_size), _name(name)
        self.name = name
        if block_size < 512 or block_size > 65536 or (block_size & (block_size - 1)):
            raise FormatError(name, "block_size", block_size, "must be a power of two from 512 to 65536")
        if algo != ALGO_LZ4 and algo != ALGO_ZSTD:
            raise FormatError(name, "algo", algo, "only 1 (LZ4) and 2 (ZSTD) are supported")
        bound = (_lz4_bound(block_size) if algo == ALGO_LZ4 else _zstd_bound(block_size)) + 4
        mv = _rbuf(table)
        cnt = len(mv) // 4
        need = -(-original_size // block_size)
        if cnt != need:
            raise FormatError(name, "index_size", cnt,
                              f"{original_size} bytes in {block_size}-byte blocks need {need} blocks")
        boff = []                       # block starts relative to base, plus the end
        pos = data_start
        for i, (t,) in enumerate(struct.iter_unpack("=I", mv[:cnt * 4])):
            boff.append(pos)
            if t <= (4 if verify else 0) or t > bound:
                raise FormatError(name, f"jump table entry {i}", t,
                                  f"stored block length must be in {5 if verify else 1}..{bound}")
            pos += t
        boff.append(pos)
        if pos > data_end:
            raise FormatError(name, "jump table", pos,
                              f"blocks end at byte {pos}, past the jump table at {data_end}")
        self._fd = fd
        self._base = base
        self._size = original_size
        self._boff = boff
        self._block_size = block_size
        self._algo = algo
        self._verify = verify

    def map_blocks(self):
        """The core reads an immutable local ZFile through a mapping; here
        reads stay preads (the results are the same).  Always False."""
        return False

    @property
    def mapped(self):
        return False

    @property
    def nblocks(self):
        return len(self._boff) - 1

    def block_extent(self, i):
        """(start, length) in the file, relative to base, of stored block i."""
        i = _u64(i)
        if i >= self.nblocks:
            raise IndexError(i)
        return self._boff[i], self._boff[i + 1] - self._boff[i]

    def _decode_block(self, blk, src, want):
        """Check one stored block's CRC and decompress it to exactly `want` bytes."""
        if self._verify:
            src, (stored,) = src[:-4], struct.unpack("<I", src[-4:])
            calc = crc32c(src, SALT)
            if stored != calc:
                raise _Fail(E_CRC, blk, stored, calc)
        if self._algo == ALGO_LZ4:
            try:
                out = lz4.block.decompress(src, uncompressed_size=want)
            except (lz4.block.LZ4BlockError, ValueError):
                out = None
        else:
            out = _zstd_decompress(src, want)
        if out is None or len(out) != want:
            raise _Fail(E_DECODE, blk, -1 if out is None else len(out), want)
        return out

    def _read_inside(self, dst, off):
        n = len(dst)
        bs, boff = self._block_size, self._boff
        blk, last = off // bs, (off + n - 1) // bs
        while blk <= last:
            # blocks blk..stop-1 come from one pread of at most COALESCE_MAX bytes
            stop = blk + 1
            while stop <= last and boff[stop + 1] - boff[blk] <= COALESCE_MAX:
                stop += 1
            cbuf = bytearray(boff[stop] - boff[blk])
            _check_present(self, self._base + boff[blk], len(cbuf))
            _pread_into(self._fd, memoryview(cbuf), self._base + boff[blk])
            for i in range(blk, stop):
                bstart = i * bs
                want = min(bs, self._size - bstart)
                plain = self._decode_block(i, cbuf[boff[i] - boff[blk]:boff[i + 1] - boff[blk]], want)
                lo, hi = max(off, bstart), min(off + n, bstart + want)
                dst[lo - off:hi - off] = plain[lo - bstart:hi - bstart]
            blk = stop

    def verify_all(self):
        """Check every block's CRC and decompression; raises on the first bad one."""
        off = 0
        while off < self._size:
            n = min(VERIFY_STEP, self._size - off)
            try:
                self._read_inside(memoryview(bytearray(n)), off)
            except _Fail as err:
                err.which = 0
                _raise(err, [self])
            off += n


# ---------------------------------------------------------------- stack
class _Pending:
    """A data read not issued yet; the next contiguous one extends it."""
    __slots__ = ("tag", "foff", "dst", "len")

    def __init__(self):
        self.tag = self.foff = self.dst = self.len = 0


class Stack:
    """Read-merge over a stack: `files` top-first (lower tags index it),
    the merged lower Index, and an optional upper (RW) Index whose records
    read from files[-1].  Upper data and zeroed records both shadow the
    lower stack; only holes fall through; a hole everywhere reads as zeros."""

    def __init__(self, files, lower=None, upper=None):
        if files is not None and type(files) is not list:
            raise TypeError(f"Argument 'files' has incorrect type (expected list, got {type(files).__name__})")
        _typed(lower, Index, "lower")
        _typed(upper, Index, "upper")
        if len(files) > 256:
            raise UsageError(f"too many backing files: {len(files)}")
        self._files = list(files)
        for f in self._files:
            if not isinstance(f, Backing):
                raise TypeError(f"Cannot convert {type(f).__name__} to tcmu_obd.core.reference.Backing")
        self._lower = lower
        self._upper = upper
        self._upper_tag = len(self._files) - 1
        self._lower_tags = len(self._files) - 1 if upper is not None else len(self._files)
        if upper is not None and not self._files:
            raise UsageError("an upper index needs its backing file last in `files`")
        if upper is not None and upper is lower:
            raise UsageError("the upper index cannot also be the lower one")
        if lower is not None:
            for i, r in enumerate(lower._recs):
                if r[4] >= len(self._files) or (upper is not None and r[4] == self._upper_tag):
                    raise UsageError(f"lower record {i} has tag {r[4]}, no such file")

    @property
    def lower(self):
        return self._lower

    @property
    def upper(self):
        return self._upper

    # Reads are collected the way the C core collects them (a data piece that
    # continues the pending one in the same file and the same buffer extends
    # it), so a failing read reports the same offset, length and error.
    def _flush(self, p, dst):
        if p.len:
            try:
                self._files[p.tag]._readinto(dst[p.dst:p.dst + p.len], p.foff)
            except _Fail as err:
                err.which = p.tag
                raise
        p.len = 0

    def _emit(self, r, tag, s, e, dst, base, p):
        """Serve sectors [s, e) of record r into dst (dst starts at sector base)."""
        d = (s - base) * SECTOR
        n = (e - s) * SECTOR
        if r[3]:
            dst[d:d + n] = bytes(n)
            return
        if r[2] + (s - r[0]) >= 1 << 55:         # past 2^64 bytes: the C core reports 2^64-1
            err = _Fail(E_RANGE, U64, n, self._files[tag].size)
            err.which = tag
            raise err
        foff = (r[2] + (s - r[0])) * SECTOR
        if p.len and p.tag == tag and p.foff + p.len == foff and p.dst + p.len == d:
            p.len += n
            return
        self._flush(p, dst)
        p.tag, p.foff, p.dst, p.len = tag, foff, d, n

    def _read_lower(self, s, e, dst, base, p):
        pos = s
        if self._lower is not None:
            recs = self._lower._recs
            i = self._lower._first_end_after(s)
            while i < len(recs) and recs[i][0] < e:
                r = recs[i]
                if r[4] >= self._lower_tags:
                    raise _Fail(E_TAG, r[0], r[4])
                rs = max(r[0], pos)
                if rs > pos:
                    dst[(pos - base) * SECTOR:(rs - base) * SECTOR] = bytes((rs - pos) * SECTOR)
                re = min(_end(r), e)
                self._emit(r, r[4], rs, re, dst, base, p)
                pos = re
                i += 1
        if pos < e:
            dst[(pos - base) * SECTOR:(e - base) * SECTOR] = bytes((e - pos) * SECTOR)

    def _read(self, dst, s, e):
        p = _Pending()
        if self._upper is None:
            self._read_lower(s, e, dst, s, p)
        else:
            with self._upper._lock:             # inserts wait until the walk is done
                recs = self._upper._recs
                pos = s
                i = self._upper._first_end_after(s)
                while i < len(recs) and recs[i][0] < e:
                    r = recs[i]
                    rs = max(r[0], pos)
                    if rs > pos:
                        self._read_lower(pos, rs, dst, s, p)
                    re = min(_end(r), e)
                    self._emit(r, self._upper_tag, rs, re, dst, s, p)
                    pos = re
                    i += 1
                if pos < e:
                    self._read_lower(pos, e, dst, s, p)
        self._flush(p, dst)

    def read_into(self, buf, offset):
        """Fill the writable buffer `buf` with the stack's bytes at `offset`.
        offset and len(buf) must be multiples of 512."""
        offset = _u64(offset)
        dst = _wbuf(buf)
        n = len(dst)
        if offset % SECTOR or n % SECTOR:
            raise UsageError(f"read of {n} bytes at {offset} is not 512-byte aligned")
        tries = {}
        try:
            while True:
                try:
                    self._read(dst, offset // SECTOR, (offset + n) // SECTOR)
                    return None
                except _Fail as err:
                    if not _recover(err, self._files, tries):
                        _raise(err, self._files)
        finally:
            _unpin_all(tries)

    def replace_file(self, tag, backing):
        """Serve file `tag` from another backing with the same bytes."""
        if not 0 <= tag < len(self._files):
            raise UsageError(f"no file with tag {tag}")
        _typed(backing, Backing, "backing", none_ok=False)
        if self._files[tag].size != backing.size:
            raise UsageError(f"replacement for file {tag} has {backing.size} bytes, not {self._files[tag].size}")
        self._files[tag] = backing

    @property
    def backings(self):
        return list(self._files)

    def read(self, offset, length):
        offset, length = _u64(offset), _u64(length)
        out = bytearray(length)
        self.read_into(out, offset)
        return bytes(out)

    def lookup(self, offset, length):
        """The effective records for [offset, offset+length) in sectors:
        upper records (tag = upper file) with lower ones in their holes."""
        offset, length = _u64(offset), _u64(length)
        if self._upper is None:
            return self._lower.lookup(offset, length) if self._lower is not None else []
        out = []
        pos = offset
        end = offset + length
        for r in self._upper.lookup(offset, length):
            if r[0] > pos and self._lower is not None:
                out.extend(self._lower.lookup(pos, r[0] - pos))
            out.append((r[0], r[1], r[2], r[3], self._upper_tag))
            pos = r[0] + r[1]
        if pos < end and self._lower is not None:
            out.extend(self._lower.lookup(pos, end - pos))
        return out


# ---------------------------------------------------------------- encode
def compress_blocks(algo, data, block_size, verify):
    """Compress `data` into consecutive blocks of block_size bytes (the last
    may be shorter), each followed by its salted CRC when verify.  Returns
    (stored bytes, list of stored lengths).

    The bytes need not equal _lsmt's: python-lz4 compresses through
    LZ4_compress_fast_continue on a fresh stream (not LZ4_compress_default),
    and the zstandard wheel bundles its own libzstd.  Either side decodes the
    other's output to the same data."""
    algo, block_size, verify = _int(algo), _u32(block_size), bool(verify)
    if algo != ALGO_LZ4 and algo != ALGO_ZSTD:
        raise UsageError(f"unknown compression algorithm {algo}")
    if block_size == 0:
        raise UsageError("block_size must be positive")
    mv = _rbuf(data)
    size = len(mv)
    nblk = -(-size // block_size)
    if algo == ALGO_LZ4 and nblk and _lz4_bound(block_size) == 0:
        raise UsageError("compression failed")      # LZ4 cannot take blocks this large
    zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    parts, lengths = [], []
    for i in range(nblk):
        block = mv[i * block_size:min(size, (i + 1) * block_size)]
        if algo == ALGO_LZ4:
            c = lz4.block.compress(block, mode="default", store_size=False)
        else:
            c = zc.compress(block)
        if verify:
            c += struct.pack("<I", crc32c(c, SALT))
        parts.append(c)
        lengths.append(len(c))
    return b"".join(parts), lengths
