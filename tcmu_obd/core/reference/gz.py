"""The pure-Python twin of the core's GzipBacking (tcmu_obd/core/_lsmt_gzip.pxi):
a gzip blob's decompressed stream read at random through a ddgzidx index,
with Python's zlib module.

Each read inflates from its access point again (no decoded-span cache, no
kept inflate state: only speed differs).  Python's zlib cannot prime an
inflate with the `bits` left in byte en_pos-1 (nor give a raw inflate a
dictionary after priming), so for bits != 0 a raw deflate prefix is built
(primed_prefix) that leaves the inflater exactly as priming would: history =
the window, `bits` bits of byte en_pos-1 pending, byte alignment kept.  Errors are the C core's, with
one difference: for a zlib data error the offset in the message's text is
the end of the compressed bytes read so far (the fields are the same).
It does not parse index files (tcmu_obd.format.gzindex does: the access
points come as plain ints and bytes, checked here) and it does not fetch (a miss of the target is reported in the target's coordinates).
"""
import zlib

from tcmu_obd.core import readerr
from tcmu_obd.core.reference._common import E_RANGE, E_SHORT, ReadFail, U64, check_name
from tcmu_obd.core.reference.backing import Backing
from tcmu_obd.core.reference.cache import check_present
from tcmu_obd.errors import FormatError, UsageError

E_INFLATE = readerr.E_INFLATE
WINDOW = 32768
CHUNK = 65536          # compressed bytes read at once (as the C core)
PIECE = 1 << 20        # a miss in the C core decodes at most this far past the offset,
STEP = 65536           # rounded up to a multiple of this from the access point
ENDED, TRUNC, BADWIN = 1, 2, 3


class _Bits:
    """An LSB-first bit writer (deflate's bit order)."""

    def __init__(self):
        self.v = 0
        self.n = 0

    def put(self, value, nbits):
        self.v |= value << self.n
        self.n += nbits

    def huff(self, code, nbits):
        """A Huffman code: its bits go most significant first."""
        self.put(int(format(code, f"0{nbits}b")[::-1], 2), nbits)


def _fixed_literal(w, b):
    if b < 144:
        w.huff(0x30 + b, 8)
    else:
        w.huff(0x190 + b - 144, 9)


def primed_prefix(window, bits, byte):
    """What inflatePrime(bits, byte >> (8-bits)) + inflateSetDictionary(window)
    do, for Python's zlib, which has neither for raw streams: a raw deflate
    prefix of whole bytes whose last byte ends with the top `bits` bits of
    `byte` (the access point's first bits).  It is non-final fixed-Huffman
    blocks that emit the window as literals (so the history is the window)
    after 6 or 9 filler bytes, and that end exactly `bits` bits before a byte
    boundary: the blocks after the access point keep their byte alignment
    (stored blocks need it).  Returns (prefix, output bytes to discard)."""
    w = _Bits()
    w.put(0, 1)                 # BFINAL 0
    w.put(1, 2)                 # BTYPE 01: fixed Huffman
    for _ in range(6):
        _fixed_literal(w, 0x61)
    body = sum(9 if b >= 144 else 8 for b in window) + 7         # + end of block
    extra = 0
    if (w.n + body) % 2 != (8 - bits) % 2:
        w.huff(1, 7)            # length 3 (code 257)
        w.huff(4, 5)            # distance 5 (code 4) + 1 extra bit 0: 13 bits, odd
        w.put(0, 1)
        extra = 3
    for b in window:
        _fixed_literal(w, b)
    w.huff(0, 7)                # end of block
    while w.n % 8 != (8 - bits) % 8:
        w.put(0, 1)
        w.put(1, 2)
        w.huff(0, 7)            # an empty fixed block: 10 bits
    w.put(byte >> (8 - bits), bits)
    return w.v.to_bytes(w.n // 8, "little"), 6 + extra + len(window)


def check_points(points, windows_len, size, target_size, raw_windows, name):
    """As the C core's gz_check_points: the access points as a list of int
    5-tuples, or FormatError(name, "access point I FIELD", value, why)."""
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
        if not 1 <= wlen < (1 << 32) or (raw_windows and wlen != WINDOW):
            raise FormatError(name, f"access point {i} win_len", wlen,
                              f"must be {WINDOW} (raw windows)" if raw_windows else "must be 1..2**32-1")
        if not 0 <= woff <= windows_len - wlen:
            raise FormatError(name, f"access point {i} win_off", woff,
                              f"the {wlen}-byte window lies outside the {windows_len} bytes of windows")
        out.append((de, en, bits, woff, wlen))
        prev = de
    if not out:
        raise FormatError(name, "access point 0 de_pos", None, "there must be at least one access point")
    return out


class GzipBacking(Backing):
    """As _lsmt.GzipBacking (same arguments; cache_slots is accepted and
    only range-checked)."""

    def __init__(self, target, points, windows, size, name="<gzip>", cache_slots=8, *, raw_windows=False):
        super().__init__()
        if not isinstance(target, Backing):
            raise TypeError(f"Argument 'target' has incorrect type (expected Backing, got {type(target).__name__})")
        name = check_name(name)
        self.name = name
        wins = windows if type(windows) is bytes else bytes(memoryview(windows))
        pts = check_points(points, len(wins), size, target.size, bool(raw_windows), name)
        if not 0 <= cache_slots <= 64:
            raise UsageError(f"cache_slots {cache_slots}: must be 0..64")
        self.target = target
        self.fetcher = target.fetcher
        self._fd = target.fd
        self._size = size
        self._wins = wins
        self._raw = bool(raw_windows)
        self._pts = pts
        self._des = [p[0] for p in self._pts]

    def attach(self, presence, fetcher):
        raise UsageError(f"{self.name}: attach the cache to the gzip blob's backing (the target), "
                         f"before making the GzipBacking")

    @property
    def points(self):
        return len(self._pts)

    def _window(self, i):
        _, _, _, woff, wlen = self._pts[i]
        raw = self._wins[woff:woff + wlen]
        if self._raw:
            return raw
        d = zlib.decompressobj()
        try:
            out = d.decompress(raw, WINDOW + 1)
        except zlib.error:
            out = b""
        if len(out) != WINDOW or not d.eof:
            raise ReadFail(E_INFLATE, i, BADWIN, woff)
        return out

    def _find(self, pos):
        import bisect
        return bisect.bisect_right(self._des, pos) - 1

    def _span_end(self, i):
        return self._des[i + 1] if i + 1 < len(self._des) else self._size

    def _inflate(self, i, upto):
        """The stream's bytes [de_i, upto) inflated from access point i."""
        t = self.target
        de, en, bits, _, _ = self._pts[i]
        if t._presence is not None:
            cs = en - (1 if bits else 0)
            ce = min(t.size, self._pts[i + 1][1] + CHUNK) if i + 1 < len(self._pts) else t.size
            if ce > cs:
                check_present(t, t._base + cs, ce - cs)
        pos = en
        if bits:        # the byte holding the access point's first bits (read before the window, as in C)
            first = bytearray(1)
            t._readinto(memoryview(first), en - 1)
        win = self._window(i)
        if bits:
            prefix, skip = primed_prefix(win, bits, first[0])
            d = zlib.decompressobj(wbits=-15)
            try:        # the prefix ends with the next block's first bits: they can be bad
                got = len(d.decompress(prefix))
            except zlib.error:
                raise ReadFail(E_INFLATE, i, (-3) & U64, pos) from None
            if got != skip or d.unconsumed_tail or d.eof:
                raise AssertionError("the priming prefix did not inflate as built")
        else:
            d = zlib.decompressobj(wbits=-15, zdict=win)
        want = upto - de
        out = bytearray()
        while len(out) < want:
            if d.eof:
                raise ReadFail(E_INFLATE, i, ENDED, de + len(out))
            if pos >= t.size:
                raise ReadFail(E_INFLATE, i, TRUNC, pos)
            n = min(CHUNK, t.size - pos)
            buf = bytearray(n)
            t._readinto(memoryview(buf), pos)
            pos += n
            data = bytes(buf)
            try:
                out += d.decompress(data, want - len(out))
                while d.unconsumed_tail and len(out) < want:
                    out += d.decompress(d.unconsumed_tail, want - len(out))
            except zlib.error:
                raise ReadFail(E_INFLATE, i, (-3) & U64, pos) from None
        return out

    def _readinto(self, dst, off):
        n = len(dst)
        if n == 0:
            return
        end = off + n
        if end > U64:
            raise ReadFail(E_RANGE, off, n, self._size)
        stop = min(end, self._size)
        pos = off
        while pos < stop:
            # decode as far as the C core does on a miss (gz_fill_end), so a
            # stream shorter than the index says fails alike
            i = self._find(pos)
            de, se = self._des[i], self._span_end(i)
            e = min(min(stop, se), pos + PIECE)
            fe = min(se, de + (e - de + STEP - 1) // STEP * STEP)
            upto = min(stop, fe)
            data = self._inflate(i, fe)
            dst[pos - off:upto - off] = data[pos - de:upto - de]
            pos = upto
        if end > self._size:
            if self._zero_tail:          # a warp layer's target: zeros past the end
                dst[max(0, stop - off):n] = bytes(n - max(0, stop - off))
                return
            raise ReadFail(E_SHORT, off, n, max(0, stop - off))


__all__ = ["GzipBacking"]
