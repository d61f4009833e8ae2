"""Index records for the pure-Python twin (tcmu_obd.core.reference): the
16-byte on-disk record codec, Index (a sorted list of record tuples with
bisect; a written index keeps the same list, where _lsmt uses a B+tree) and
merge() of a stack of indexes, as _lsmt_index.pxi does them.

It reads no files and knows no backings (reference.backing, reference.stack).
"""
import bisect
import struct
import threading

from tcmu_obd.errors import FormatError, UsageError
from tcmu_obd.core.reference._common import (INVALID_OFFSET, MAX_INDEX, MAX_LENGTH, MAX_MOFFSET, U64, rbuf,
                                             ssize, u32, u64, u8)


REC_FIELDS = ("offset", "length", "moffset", "zeroed", "tag")


def _decode(w0, w1):
    return (w0 & INVALID_OFFSET, w0 >> 50, w1 & MAX_MOFFSET, (w1 >> 55) & 1, w1 >> 56)


def _encode(r):
    offset, length, moffset, zeroed, tag = r
    w0 = ((offset & INVALID_OFFSET) | (length << 50)) & U64
    w1 = ((moffset & MAX_MOFFSET) | (zeroed << 55) | (tag << 56)) & U64
    return struct.pack("<QQ", w0, w1)


def rec_end(r):
    return r[0] + r[1]


def check_room(want):
    if want > MAX_INDEX:
        raise FormatError("<index>", "record count", want, f"more than {MAX_INDEX} records")


def trim_front(r, start):
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
        mv = rbuf(data)
        cnt = len(mv) // 16
        check_room(cnt)
        idx = Index()
        for w0, w1 in struct.iter_unpack("<QQ", mv[:cnt * 16]):
            r = _decode(w0, w1)
            if r[0] == INVALID_OFFSET:
                continue
            idx._recs.append(r if keep_tags else r[:4] + (0,))
        return idx

    @staticmethod
    def from_records(records):
        """From an iterable of (offset, length, moffset, zeroed, tag), kept in
        order; a float, or a bool outside zeroed, is refused (FormatError)."""
        idx = Index()
        for rec in records:
            check_room(len(idx._recs) + 1)
            offset, length, moffset, zeroed, tag = rec
            for name, v in zip(REC_FIELDS, (offset, length, moffset, zeroed, tag)):
                if isinstance(v, bool) and name != "zeroed" or not hasattr(type(v), "__index__"):
                    raise FormatError("<records>", f"record {len(idx._recs)} {name}", v, "not an integer")
            idx._recs.append((u64(offset), u32(length), u64(moffset), u8(zeroed), u8(tag)))
        return idx

    def replay(self, data):
        """Apply an RW index log in file order: invalid and zero-length
        records skipped, tags forced to 0, each newer record wins."""
        mv = rbuf(data)
        cnt = len(mv) // 16
        self._to_tree()
        for w0, w1 in struct.iter_unpack("<QQ", mv[:cnt * 16]):
            offset, length, moffset, zeroed, _tag = _decode(w0, w1)
            if offset == INVALID_OFFSET or length == 0:
                continue
            self._insert(offset, length, moffset, zeroed, 0)

    def insert(self, offset, length, moffset, zeroed=False, tag=0):
        """Insert one record; whatever it overlaps is cut away (newer wins)."""
        offset, length, moffset = u64(offset), u32(length), u64(moffset)
        zeroed, tag = int(bool(zeroed)), u8(tag)
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
        check_room(len(self._recs) + 2)
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
        if i < j and rec_end(recs[j - 1]) > end:
            repl.append(trim_front(recs[j - 1], end))
        recs[i:j] = repl
        self._ends = None

    # -------------------------------------------------------- search
    def build_search(self):
        """Nothing to build: find() bisects the record ends."""
        self._ends = None

    def _first_end_after(self, x):
        if self._ends is None:
            self._ends = [rec_end(r) for r in self._recs]
        return bisect.bisect_right(self._ends, x)

    def find(self, x):
        """Position of the first record whose end > x (len(self) if none)."""
        return self._first_end_after(u64(x))

    # -------------------------------------------------------- inspection
    def __len__(self):
        return len(self._recs)

    def record(self, i):
        i = ssize(i)
        if i < 0 or i >= len(self._recs):
            raise IndexError(i)
        return self._recs[i]

    def records(self):
        return list(self._recs)

    def check_sorted(self):
        """-1 when sorted and non-overlapping, else the position of the
        first record that starts before its predecessor ends."""
        for i in range(1, len(self._recs)):
            if self._recs[i][0] < rec_end(self._recs[i - 1]):
                return i
        return -1

    def check_moffset(self, lo, hi, tag=-1):
        """-1 when every data record lies in [lo, hi) and every zeroed
        record has lo <= moffset <= hi; else the first bad position.
        tag >= 0: only records with that tag are checked."""
        lo, hi = u64(lo), u64(hi)
        for i, (_off, length, moffset, zeroed, rtag) in enumerate(self._recs):
            if tag >= 0 and rtag != tag:
                continue
            if zeroed:
                if moffset < lo or moffset > hi:
                    return i
            elif moffset < lo or moffset >= hi or moffset + length > hi:
                return i
        return -1

    def check_starts(self, tag, limit):
        """-1 when every data record with this tag starts below `limit`
        (sectors), else the first position of one that does not."""
        limit = u64(limit)
        for i, (_off, _length, moffset, zeroed, rtag) in enumerate(self._recs):
            if rtag == tag and not zeroed and moffset >= limit:
                return i
        return -1

    def normalise_tags(self, max_tag):
        """overlaybd's warp-file rule: subtract the smallest tag present
        from every tag.  Returns (that smallest tag, the first position
        whose tag is still above max_tag, or -1)."""
        lo = min((r[4] for r in self._recs), default=0)
        self._recs = [(r[0], r[1], r[2], r[3], r[4] - lo) for r in self._recs]
        bad = next((i for i, r in enumerate(self._recs) if r[4] > max_tag), -1)
        return lo, bad

    def data_sectors(self):
        """Sectors held by non-zeroed records (fstat's st_blocks)."""
        return sum(r[1] for r in self._recs if not r[3]) & U64

    def dump(self, pad_to=1):
        """On-disk bytes of the records (tags kept), padded with invalid
        records to a multiple of pad_to records."""
        pad_to = ssize(pad_to)
        total = len(self._recs)
        if pad_to > 1 and total % pad_to:
            total += pad_to - total % pad_to
        pad = _encode((INVALID_OFFSET, 0, 0, 0, 0))
        return b"".join(_encode(r) for r in self._recs) + pad * (total - len(self._recs))

    def lookup(self, offset, length):
        """Records overlapping [offset, offset+length) in sectors, the first
        and last trimmed to it (moffset advanced unless zeroed)."""
        offset, length = u64(offset), u64(length)
        end = offset + length
        out = []
        i = self._first_end_after(offset)
        while i < len(self._recs) and self._recs[i][0] < end:
            r = self._recs[i]
            if r[0] < offset:
                r = trim_front(r, offset)
            if rec_end(r) > end:
                r = (r[0], end - r[0], r[2], r[3], r[4])
            out.append(r)
            i += 1
        return out


def merge(layers, bases=None):
    """Merge indexes given top-first into one: each layer fills only the
    holes left by the layers above it; tag = position in `layers`.  With
    `bases` (one file number per layer), tag = bases[i] + the record's own
    tag instead: a warp layer's tag-1 records then name its target file."""
    if type(layers) is not list:
        raise TypeError(f"Argument 'layers' has incorrect type (expected list, got {type(layers).__name__})")
    if len(layers) > 255:
        raise FormatError("<stack>", "layer count", len(layers), "at most 255 read-only layers")
    if bases is not None and len(bases) != len(layers):
        raise UsageError(f"{len(bases)} bases for {len(layers)} layers")
    acc = []                                    # merged so far: sorted, non-overlapping
    for li in range(len(layers)):
        low = layers[li]
        if not isinstance(low, Index):
            raise TypeError(f"Cannot convert {type(low).__name__} to tcmu_obd.core.reference.Index")
        if bases is not None:
            base = bases[li]
            maxtag = max((r[4] for r in low._recs), default=0)
            if base < 0 or base + maxtag > 255:
                raise FormatError("<stack>", "file number", base + maxtag, "at most 255 read-only files")
        check_room(len(acc) + 2 * len(low._recs) + 1)
        ends = [rec_end(a) for a in acc]
        pieces = []
        for rec in low._recs:
            start, e = rec[0], rec_end(rec)
            k = bisect.bisect_right(ends, start)   # first upper record ending after start
            pos = start
            while pos < e:                         # walk the holes of acc inside [start, e)
                if k < len(acc) and acc[k][0] <= pos:
                    pos = max(pos, ends[k])
                    k += 1
                    continue
                gend = min(e, acc[k][0]) if k < len(acc) else e
                pieces.append((pos, gend - pos, rec[2] if rec[3] else rec[2] + (pos - start),
                               rec[3], li if bases is None else bases[li] + rec[4]))
                pos = gend
        acc = sorted(acc + pieces, key=lambda r: r[0])
        if len(acc) > MAX_INDEX:                # the C core fails on the push past the limit
            check_room(MAX_INDEX + 1)
    out = Index()
    out._recs = acc
    return out
