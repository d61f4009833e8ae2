"""ZFile: overlaybd's seekable block-compressed container (docs/formats.md, ZFile).

Parses and writes the 512-byte header/trailer, loads the jump table into a
core ZFileBacking (which decodes blocks without the GIL), and provides the
streaming writer used by commit, merge and overlaybd-zfile.  It does not
know about LSMT or tar: callers stack those around it.
"""
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tcmu_obd import core
from tcmu_obd.errors import CorruptDataError, FormatError, UsageError

MAGIC0 = bytes.fromhex("5A46696C65000100")
MAGIC1 = b"tuji.yyf@Alibaba"
HT_SIZE = 512

F_HEADER = 1 << 0
F_DATA = 1 << 1
F_SEALED = 1 << 2
F_OVERWRITE = 1 << 3
F_DIGEST = 1 << 4
F_IDX_COMP = 1 << 5

ALGO_LZ4 = 1
ALGO_ZSTD = 2
ALGOS = {"lz4": ALGO_LZ4, "zstd": ALGO_ZSTD}
MAX_BLOCKS = 1_000_000_000

# magic0 magic1 size digest flags index_offset index_size original_size
# index_crc reserved0 block_size algo level use_dict pad reserved dict_size verify
_ZH = struct.Struct("<8s16sIIQQQQIIIBBBBIIB7x")
assert _ZH.size == 96


@dataclass
class ZHeader:
    flags: int
    index_offset: int = 0
    index_size: int = 0
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = 4096
    algo: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: int = 1
    digest: int = 0

    def pack(self):
        """The 512-byte block, with its digest computed when F_DIGEST is set."""
        def build(digest):
            body = _ZH.pack(MAGIC0, MAGIC1, 96, digest, self.flags, self.index_offset,
                            self.index_size, self.original_file_size, self.index_crc, 0,
                            self.block_size, self.algo, self.level, self.use_dict, 0, 0,
                            self.dict_size, self.verify)
            return body + bytes(HT_SIZE - len(body))
        raw = build(0)
        if self.flags & F_DIGEST:
            raw = build(core.crc32c(raw))
        return raw

    @classmethod
    def unpack(cls, raw, path, where):
        if len(raw) < HT_SIZE:
            raise FormatError(path, f"zfile {where}", len(raw), f"needs {HT_SIZE} bytes")
        (m0, m1, _size, digest, flags, ioff, isize, osize, icrc, _r0, bs, algo, level, use_dict,
         _pad, _r1, dict_size, verify) = _ZH.unpack_from(raw)
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise FormatError(path, f"zfile {where} magic", m0 + m1, "not a ZFile")
        return cls(flags, ioff, isize, osize, icrc, bs, algo, level, use_dict, dict_size, verify, digest)


def is_zfile_magic(raw):
    """True when `raw` starts with both ZFile magics (however short the rest is)."""
    return raw[:8] == MAGIC0 and raw[8:24] == MAGIC1


def is_zfile(raw, path="<zfile>"):
    """overlaybd's detection: magic and HEADER bit; a flagged digest that
    does not match is an error, not 'not a ZFile'."""
    if len(raw) < HT_SIZE or raw[:8] != MAGIC0 or raw[8:24] != MAGIC1:
        return False
    hdr = ZHeader.unpack(raw, path, "header")
    if not hdr.flags & F_HEADER:
        return False
    _check_digest(raw, hdr, path)
    return True


def _check_digest(raw, hdr, path):
    if hdr.flags & F_DIGEST:
        calc = core.crc32c(raw[:28] + b"\0\0\0\0" + raw[32:HT_SIZE])
        if calc != hdr.digest:
            raise CorruptDataError(path, "zfile header digest", hdr.digest, f"computed 0x{calc:08x}")


def read_info(read_at, size, path):
    """The header/trailer that describes the file: (ZHeader, jump table bytes)."""
    raw = read_at(0, HT_SIZE)
    if size < 2 * HT_SIZE:
        why = "truncated: " if is_zfile_magic(raw) else "too short: "
        raise FormatError(path, "zfile size", size, f"{why}a ZFile needs at least {2 * HT_SIZE} bytes "
                          "(header and trailer)")
    hdr = ZHeader.unpack(raw, path, "header")
    if not hdr.flags & F_HEADER:
        raise FormatError(path, "zfile header flags", hdr.flags, "HEADER bit is clear")
    _check_digest(raw, hdr, path)
    if hdr.flags & F_OVERWRITE:
        info, limit, where = hdr, size - HT_SIZE, "header"
        need = info.index_offset + 4 * info.index_size + HT_SIZE
        start = HT_SIZE + info.dict_size
        if start <= info.index_offset and info.index_size <= MAX_BLOCKS and need > size:
            # cut short, unless the header contradicts itself (then it is damaged)
            _check_geometry(info, where, path)
            if info.index_offset - start <= info.index_size * _max_stored(info.block_size):
                raise FormatError(path, "zfile size", size,
                                  f"truncated: the header puts a jump table of {info.index_size} "
                                  f"entries at byte {info.index_offset}, so the file needs {need} bytes")
    else:
        toff = size - HT_SIZE
        tail = read_at(toff, HT_SIZE)
        if len(tail) == HT_SIZE and not is_zfile_magic(tail):
            raise FormatError(path, "zfile trailer magic", tail[:24],
                              f"no ZFile trailer in the last {HT_SIZE} bytes of the {size}-byte file: "
                              "truncated, or the trailer is damaged")
        info = ZHeader.unpack(tail, path, "trailer")
        where = "trailer"
        if info.flags & F_HEADER or not (info.flags & F_DATA and info.flags & F_SEALED):
            raise FormatError(path, "zfile trailer flags", info.flags,
                              "must have HEADER clear and TYPE_DATA and SEALED set")
        limit = toff
    if info.flags & F_IDX_COMP:
        raise FormatError(path, f"zfile {where} flags", info.flags, "compressed jump table (bit 5) is not supported")
    if info.index_size > MAX_BLOCKS:
        raise FormatError(path, f"zfile {where} index_size", info.index_size, f"more than {MAX_BLOCKS} blocks")
    data_start = HT_SIZE + info.dict_size
    if info.index_offset < data_start or info.index_offset > limit or \
            info.index_size * 4 > limit - info.index_offset:
        raise FormatError(path, f"zfile {where} index_offset", info.index_offset,
                          f"a jump table of {info.index_size} entries there does not fit before byte {limit}")
    _check_geometry(info, where, path)
    table = read_at(info.index_offset, info.index_size * 4)
    if len(table) != info.index_size * 4:
        raise FormatError(path, "zfile jump table", len(table), "file ends inside the jump table")
    if info.flags & F_DIGEST:
        calc = core.crc32c(table)
        if calc != info.index_crc:
            raise CorruptDataError(path, f"zfile {where} index_crc", info.index_crc, f"computed 0x{calc:08x}")
    return info, table


def _max_stored(block_size):
    """An upper bound of one stored block: the worse of LZ4's and ZSTD's
    compress bounds for that block size, plus its CRC."""
    return block_size + block_size // 128 + 128 + 4


def _check_geometry(info, where, path):
    """block_size, algo and original_file_size, checked in Python ints before
    they reach the core (whose u64 block-count arithmetic would wrap for an
    original_file_size near 2**64 and then read past its block table)."""
    bs = info.block_size
    if bs < 512 or bs > 65536 or bs & (bs - 1):
        raise FormatError(path, f"zfile {where} block_size", bs, "must be a power of two from 512 to 65536")
    if info.algo not in (ALGO_LZ4, ALGO_ZSTD):
        raise FormatError(path, f"zfile {where} algo", info.algo, "only 1 (LZ4) and 2 (ZSTD) are supported")
    need = -(-info.original_file_size // bs)
    if need != info.index_size:
        raise FormatError(path, f"zfile {where} original_file_size", info.original_file_size,
                          f"needs {need} blocks of {bs} bytes, but index_size = {info.index_size}")


def open_backing(fd, base, size, path, read_at=None):
    """A core ZFileBacking over bytes [base, base+size) of fd; `read_at`
    (file offsets) replaces pread for the header, trailer and jump table."""
    if read_at is None:
        def read_at(off, n):
            return os.pread(fd, n, off)
    info, table = read_info(lambda off, n: read_at(base + off, n), size, path)
    return core.ZFileBacking(fd, base, HT_SIZE + info.dict_size, info.index_offset, table,
                             info.block_size, info.algo, bool(info.verify), info.original_file_size,
                             str(path)), info


class ZFileWriter:
    """Streaming ZFile builder: write() any amount, close() finishes.

    `out` needs only write(); overwrite_header also needs seek().  With
    threads > 1, chunks of blocks are compressed by a pool and written in
    order, so the output is identical to the single-threaded one.
    """
    CHUNK_BLOCKS = 64

    def __init__(self, out, algo=ALGO_LZ4, block_size=4096, verify=True, overwrite_header=False,
                 threads=1):
        if block_size not in (4096, 8192, 16384, 32768, 65536):
            raise UsageError(f"ZFile block size {block_size} is not a power of two from 4 KiB to 64 KiB")
        if algo not in (ALGO_LZ4, ALGO_ZSTD):
            raise UsageError(f"unknown ZFile algorithm {algo}")
        self.out = out
        self.info = ZHeader(F_HEADER | F_DATA | F_DIGEST, block_size=block_size, algo=algo,
                            verify=1 if verify else 0)
        self.overwrite_header = overwrite_header
        self.lengths = []
        self.pos = HT_SIZE
        self.raw_size = 0
        self.buf = bytearray()
        self.chunk = block_size * self.CHUNK_BLOCKS
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.pending = deque()
        self.max_pending = 2 * threads
        self.closed = False
        out.write(self.info.pack())

    def write(self, data):
        """Buffer only a partial chunk; whole chunks go to the compressor
        straight from the caller's buffer (copied once for a pool, unless
        the caller's object is immutable bytes)."""
        view = memoryview(data).cast("B")
        n = len(view)
        self.raw_size += n
        if self.buf:
            take = min(n, self.chunk - len(self.buf))
            self.buf += view[:take]
            view = view[take:]
            if len(self.buf) < self.chunk:
                return n
            self._submit(bytes(self.buf))
            self.buf = bytearray()
        whole = len(view) - len(view) % self.chunk
        step = self.chunk * max(1, (1 << 20) // self.chunk)
        for pos in range(0, whole, step):
            piece = view[pos:min(pos + step, whole)]
            if self.pool is not None and not isinstance(data, bytes):
                piece = bytes(piece)
            self._submit(piece)
        if whole < len(view):
            self.buf += view[whole:]
        return n

    def _submit(self, data):
        info = self.info
        if self.pool is None:
            self._emit(core.compress_blocks(info.algo, data, info.block_size, bool(info.verify)))
            return
        self.pending.append(self.pool.submit(core.compress_blocks, info.algo, data,
                                             info.block_size, bool(info.verify)))
        while len(self.pending) > self.max_pending:
            self._emit(self.pending.popleft().result())

    def _emit(self, result):
        stored, lengths = result
        self.out.write(stored)
        self.pos += len(stored)
        self.lengths.extend(lengths)

    def close(self):
        """Flush the last block, write the jump table and trailer (and the
        final header when overwrite_header).  Returns the file size."""
        if self.closed:
            return self.pos
        self.closed = True
        if self.buf:
            self._submit(bytes(self.buf))
            self.buf = bytearray()
        while self.pending:
            self._emit(self.pending.popleft().result())
        if self.pool is not None:
            self.pool.shutdown()
        table = struct.pack(f"<{len(self.lengths)}I", *self.lengths)
        info = self.info
        info.index_offset = self.pos
        info.index_size = len(self.lengths)
        info.original_file_size = self.raw_size
        info.index_crc = core.crc32c(table)
        info.flags = F_DATA | F_SEALED | F_DIGEST
        self.out.write(table)
        self.out.write(info.pack())
        self.pos += len(table) + HT_SIZE
        if self.overwrite_header:
            info.flags = F_HEADER | F_DATA | F_OVERWRITE | F_DIGEST
            self.out.seek(0)
            self.out.write(info.pack())
            self.out.seek(self.pos)
        return self.pos

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
