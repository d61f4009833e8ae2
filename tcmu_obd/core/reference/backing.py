"""Backings and block codec for the pure-Python twin (tcmu_obd.core.reference):
crc32c(), Backing / RawBacking / ZFileBacking (preads, ZFile block CRC
check and LZ4/ZSTD decode through the lz4 and zstandard packages) and
compress_blocks(), as _lsmt_backing.pxi does them.

It knows byte ranges of open files, not records or stacks; it has no block
cache and no mapping (map_blocks() says False), and it leaves fetching to
reference.cache.
"""
import errno as _errno
import os
import struct

import lz4.block
import zstandard

try:                                 # the package does the CRC in C; the table loop below is the fallback
    import crc32c as _crc32c_pkg
except ImportError:                  # pragma: no cover - depends on the environment
    _crc32c_pkg = None

from tcmu_obd.errors import FormatError, UsageError
from tcmu_obd.core.reference._common import (ALGO_LZ4, ALGO_ZSTD, COALESCE_MAX, E_CRC, E_DECODE, E_IO,
                                             E_RANGE, E_SHORT, LZ4_MAX_INPUT_SIZE, ReadFail, SALT, U32, U64,
                                             VERIFY_STEP, ZSTD_LEVEL, c_int, check_name, raise_fail, rbuf,
                                             typed, u32, u64)
from tcmu_obd.core.reference.cache import Presence, check_present, recover, unpin_all

CRC_HW = bool(_crc32c_pkg is not None and getattr(_crc32c_pkg, "hardware_based", False))


def _make_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)


    return table


_CRC_TABLE = _make_table()


def crc32c_table(seed, data):
    """Raw CRC32C: reflected Castagnoli polynomial, no inversions."""
    crc = seed
    t = _CRC_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data, seed=0):
    """overlaybd's raw CRC32C of a bytes-like object, from `seed`."""
    seed = u32(seed)
    mv = rbuf(data)
    if _crc32c_pkg is not None:
        # the package computes the standard CRC (inverted in and out)
        return ~_crc32c_pkg.crc32c(mv, value=~seed & U32) & U32
    return crc32c_table(seed, mv)



def pread_into(fd, dst, off):
    """Fill the byte view dst from fd at off; short files and errors fail."""
    n = len(dst)
    done = 0
    while done < n:
        try:
            r = os.preadv(fd, [dst[done:]], off + done)
        except OverflowError:                    # offset beyond off_t (or 2^64): EINVAL
            raise ReadFail(E_IO, min(off + done, U64), n, 0, _errno.EINVAL) from None
        except OSError as e:
            raise ReadFail(E_IO, off + done, n, 0, e.errno) from None
        if r == 0:
            raise ReadFail(E_SHORT, off, n, done)
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
    _zero_tail = False

    @property
    def zero_fill_past_end(self):
        """True for a warp layer's target: reads past `size` give zeros (and
        pread is not clamped) instead of failing."""
        return self._zero_tail

    @zero_fill_past_end.setter
    def zero_fill_past_end(self, value):
        self._zero_tail = bool(value)

    def attach(self, presence, fetcher):
        """Serve this backing from a cache file (see _lsmt.Backing.attach)."""
        self._presence = typed(presence, Presence, "presence", none_ok=False)
        self.fetcher = fetcher

    @property
    def name(self):
        return self._name

    @name.setter
    def name(self, value):               # a str or None, like the C core's `public str name`
        self._name = check_name(value)

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
        if off + n > U64:
            raise ReadFail(E_RANGE, off, n, self._size)
        if off + n > self._size:
            if not self._zero_tail:
                raise ReadFail(E_RANGE, off, n, self._size)
            inside = self._size - off if off < self._size else 0
            dst[inside:n] = bytes(n - inside)       # a warp target ends inside the piece
            dst = dst[:inside]
            n = inside
            if n == 0:
                return
        if self._presence is not None:
            self._presence.touch()
        self._read_inside(dst, off)

    def _read_inside(self, dst, off):
        raise ReadFail(E_RANGE, off, len(dst), self._size)   # a bare Backing holds nothing

    def pread(self, offset, length):
        """Bytes [offset, offset+length) of the backing (clamped to its size,
        unless zero_fill_past_end: then zeros past it)."""
        offset, length = u64(offset), u64(length)
        if not self._zero_tail:
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
                except ReadFail as err:
                    err.which = 0
                    if not recover(err, [self], tries):
                        raise_fail(err, [self])
        finally:
            unpin_all(tries)
        return bytes(out)


class RawBacking(Backing):
    def __init__(self, fd, base, size, name="<raw>"):
        fd, base, size, name = c_int(fd), u64(base), u64(size), check_name(name)
        self._fd = fd
        self._base = base
        self._size = size
        self.name = name

    def _read_inside(self, dst, off):
        check_present(self, self._base + off, len(dst))
        pread_into(self._fd, dst, self._base + off)


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
        fd, base, data_start, data_end = c_int(fd), u64(base), u64(data_start), u64(data_end)
        block_size, algo, verify = u32(block_size), c_int(algo), bool(verify)
        original_size, name = u64(original_size), check_name(name)
        self.name = name
        if block_size < 512 or block_size > 65536 or (block_size & (block_size - 1)):
            raise FormatError(name, "block_size", block_size, "must be a power of two from 512 to 65536")
        if algo != ALGO_LZ4 and algo != ALGO_ZSTD:
            raise FormatError(name, "algo", algo, "only 1 (LZ4) and 2 (ZSTD) are supported")
        bound = (_lz4_bound(block_size) if algo == ALGO_LZ4 else _zstd_bound(block_size)) + 4
        mv = rbuf(table)
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
        i = u64(i)
        if i >= self.nblocks:
            raise IndexError(i)
        return self._boff[i], self._boff[i + 1] - self._boff[i]

    def _decode_block(self, blk, src, want):
        """Check one stored block's CRC and decompress it to exactly `want` bytes."""
        if self._verify:
            src, (stored,) = src[:-4], struct.unpack("<I", src[-4:])
            calc = crc32c(src, SALT)
            if stored != calc:
                raise ReadFail(E_CRC, blk, stored, calc)
        if self._algo == ALGO_LZ4:
            try:
                out = lz4.block.decompress(src, uncompressed_size=want)
            except (lz4.block.LZ4BlockError, ValueError):
                out = None
        else:
            out = _zstd_decompress(src, want)
        if out is None or len(out) != want:
            raise ReadFail(E_DECODE, blk, -1 if out is None else len(out), want)
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
            check_present(self, self._base + boff[blk], len(cbuf))
            pread_into(self._fd, memoryview(cbuf), self._base + boff[blk])
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
            except ReadFail as err:
                err.which = 0
                raise_fail(err, [self])
            off += n



# ---------------------------------------------------------------- encode
def compress_blocks(algo, data, block_size, verify):
    """Compress `data` into consecutive blocks of block_size bytes (the last
    may be shorter), each followed by its salted CRC when verify.  Returns
    (stored bytes, list of stored lengths); empty data gives (b"", []), the
    body of a valid 0-byte ZFile.  block_size: a power of two from 512 to
    65536, what a ZFile reader opens; any other is a UsageError.

    The bytes need not equal _lsmt's: python-lz4 compresses through
    LZ4_compress_fast_continue on a fresh stream (not LZ4_compress_default),
    and the zstandard wheel bundles its own libzstd.  Either side decodes the
    other's output to the same data."""
    algo, block_size, verify = c_int(algo), u32(block_size), bool(verify)
    if algo != ALGO_LZ4 and algo != ALGO_ZSTD:
        raise UsageError(f"unknown compression algorithm {algo}")
    if block_size < 512 or block_size > 65536 or (block_size & (block_size - 1)):
        # what a ZFile reader opens (ZFileBacking): never write what cannot be read
        raise UsageError(f"ZFile block_size {block_size} is not a power of two from 512 to 65536")
    mv = rbuf(data)
    size = len(mv)
    nblk = -(-size // block_size)
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
