"""The gzip index file of TurboOCI ("gzip.meta", magic "ddgzidx"): parse it
with every check overlaybd makes (and a few more that keep a hostile file
from making us allocate or read out of bounds), and write it byte for byte
as overlaybd's producer does, from a gzip blob read once.

Layout (little-endian, packed): a 333-byte header, the stored windows one
after the other (each the 32 KiB of output before an access point, zlib
compressed, or raw when dict_compress_algo is 0), then the table of 29-byte
entries (de_pos, en_pos, win_pos: int64; bits: uint8; win_len: uint32),
zlib compressed as a whole when dict_compress_algo is 1.  The header's crc
is CRC32C over its first 329 bytes with initial register 0 and no final
xor (tcmu_obd.core.crc32c with seed 0).

Reading the decompressed stream through an index is the core's job
(tcmu_obd.core GzipBacking, which takes the access points as plain values:
open_backing() here parses and hands them over); this module only knows the
file.  The writer's
inflate loop is the core's GzipScanner (zlib's block boundaries are not
visible from Python's zlib module).  GzipIndexReader runs that loop in a
worker thread and hands the decompressed stream to one reader (turboOCI-apply's
tar header walk), so the blob is inflated once, ahead of what the reader does.

Where the writer must differ from overlaybd: nowhere in the bytes.  It
takes gzip_file_size from the bytes it was fed (or the caller), not from
fstat, and it rejects a gzip stream that ends before its first member does
(overlaybd fails the same way, with a log line).
"""
import io
import os
import queue
import struct
import threading
import zlib
from collections import namedtuple

from tcmu_obd.errors import FormatError, UsageError

MAGIC = b"ddgzidx\0"
HEADER_SIZE = 333
ENTRY_SIZE = 29
WINDOW = 32768
MIN_SPAN = 65536
DEFAULT_SPAN = 1 << 20
DEFAULT_LEVEL = 6

_HEAD = struct.Struct("<8sBBBbBiiiqqqq256sqq")      # up to the crc
_ENTRY = struct.Struct("<qqqBI")
assert _HEAD.size == HEADER_SIZE - 4 and _ENTRY.size == ENTRY_SIZE

IndexEntry = namedtuple("IndexEntry", "de_pos en_pos win_pos bits win_len")


class GzIndex:
    """A parsed index: the header fields as attributes, `entries` (a list
    of IndexEntry in de_pos order), `window_area` (the file's bytes from
    `window_start` (333) to index_start: the stored windows) and `path`."""

    def __init__(self, path, fields, entries, window_area):
        self.path = path
        self.__dict__.update(fields)
        self.entries = entries
        self.window_area = window_area
        self.window_start = HEADER_SIZE

    def window_bytes(self, i):
        """Access point i's 32 KiB dictionary."""
        e = self.entries[i]
        raw = self.window_area[e.win_pos - HEADER_SIZE:e.win_pos - HEADER_SIZE + e.win_len]
        return raw if self.dict_compress_algo == 0 else zlib.decompress(raw)

    def access_points(self):
        """The entries as the core's GzipBacking takes them: (de_pos, en_pos,
        bits, win_off, win_len) with win_off relative to window_area."""
        return [(e.de_pos, e.en_pos, e.bits, e.win_pos - self.window_start, e.win_len) for e in self.entries]

    def __repr__(self):
        return (f"GzIndex({self.path!r}, {len(self.entries)} points, "
                f"{self.uncompress_file_size} bytes from {self.gzip_file_size})")


IndexInfo = GzIndex     # what build_index returns: the index it wrote, parsed


def _crc(head):
    from tcmu_obd.core import crc32c
    return crc32c(head, 0)


def _inflate_exact(data, want, path, field, value):
    """zlib-format data that must inflate to exactly `want` bytes, with no
    bytes after the stream; never allocates more than want + 1."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, want + 1)
    except zlib.error as e:
        raise FormatError(path, field, value, f"does not inflate: {e}") from None
    if len(out) != want or not d.eof or d.unconsumed_tail or d.unused_data:
        why = ("inflates to more than" if len(out) > want else
               "does not end where its stored length says" if d.eof else "inflates to less than")
        raise FormatError(path, field, value, f"{why} {want} bytes")
    return out


def parse_index(data, *, path="<gzindex>", gzip_size=None, check_windows=True):
    """A GzIndex from the bytes of an index file.  gzip_size: the size of the
    .gz blob it will be used with (checked against gzip_file_size).  Every
    bad field raises FormatError naming `path`, the field and its value."""
    data = memoryview(data).toreadonly()
    size = len(data)
    if size < HEADER_SIZE:
        raise FormatError(path, "file size", size, f"a gzip index is at least {HEADER_SIZE} bytes")
    (magic, major, minor, algo, level, flag, span, window, index_size, index_num, gzip_file_size,
     index_file_size, uncompress_file_size, _reserve, index_start, index_area_len) = _HEAD.unpack_from(data, 0)
    crc, = struct.unpack_from("<I", data, HEADER_SIZE - 4)
    # overlaybd's checks, in its order
    if index_file_size != size:
        raise FormatError(path, "index_file_size", index_file_size, f"the file has {size} bytes")
    calc = _crc(data[:HEADER_SIZE - 4])
    if crc != calc:
        raise FormatError(path, "crc", f"0x{crc:08x}", f"the header's crc32c is 0x{calc:08x}")
    if major != 1:
        raise FormatError(path, "major_version", major, "only version 1 is known")
    if index_size != ENTRY_SIZE:
        raise FormatError(path, "index_size", index_size, f"an entry is {ENTRY_SIZE} bytes")
    if magic[:7] != MAGIC[:7]:
        raise FormatError(path, "magic", bytes(magic), f"not {MAGIC[:7]!r}")
    if index_start + index_area_len != size:
        raise FormatError(path, "index_start", index_start,
                          f"+ index_area_len {index_area_len} must be the file size {size}")
    if gzip_size is not None and gzip_file_size != gzip_size:
        raise FormatError(path, "gzip_file_size", gzip_file_size, f"the gzip blob has {gzip_size} bytes")
    # ours: the fields overlaybd trusts
    if span < MIN_SPAN:
        raise FormatError(path, "span", span, f"must be at least {MIN_SPAN}")
    if window != WINDOW:
        raise FormatError(path, "window", window, f"must be {WINDOW}")
    if algo not in (0, 1):
        raise FormatError(path, "dict_compress_algo", algo, "only 0 (raw) and 1 (zlib) are known")
    if not HEADER_SIZE <= index_start <= size or index_area_len < 0:
        raise FormatError(path, "index_start", index_start,
                          f"the entry table must lie between the header and the end ({size})")
    if gzip_file_size < 0:
        raise FormatError(path, "gzip_file_size", gzip_file_size, "must not be negative")
    if uncompress_file_size < 0:
        raise FormatError(path, "uncompress_file_size", uncompress_file_size, "must not be negative")
    # every entry has a stored window of >= 8 bytes (zlib) or 32 KiB (raw)
    most = (index_start - HEADER_SIZE) // (WINDOW if algo == 0 else 8)
    if not 1 <= index_num <= most:
        raise FormatError(path, "index_num", index_num,
                          f"must be 1..{most}: each entry has a window in the {index_start - HEADER_SIZE}-byte "
                          "window area")
    area = data[index_start:size]
    want = index_num * ENTRY_SIZE
    if algo == 0:
        if index_area_len != want:
            raise FormatError(path, "index_area_len", index_area_len, f"{index_num} raw entries are {want} bytes")
        table = bytes(area)
    else:
        table = _inflate_exact(area, want, path, "index_area_len", index_area_len)
    entries = [IndexEntry(*_ENTRY.unpack_from(table, i * ENTRY_SIZE)) for i in range(index_num)]
    prev = None
    for i, e in enumerate(entries):
        if i == 0 and e.de_pos != 0:
            raise FormatError(path, "entry 0 de_pos", e.de_pos, "the first access point is at byte 0")
        if not 0 <= e.de_pos <= uncompress_file_size:
            raise FormatError(path, f"entry {i} de_pos", e.de_pos,
                              f"outside the {uncompress_file_size}-byte uncompressed stream")
        if prev is not None and e.de_pos < prev.de_pos:
            raise FormatError(path, f"entry {i} de_pos", e.de_pos, f"entries must be sorted (previous {prev.de_pos})")
        if not 0 <= e.bits <= 7:
            raise FormatError(path, f"entry {i} bits", e.bits, "must be 0..7")
        if not (1 if e.bits else 0) <= e.en_pos <= gzip_file_size:
            raise FormatError(path, f"entry {i} en_pos", e.en_pos, f"outside the {gzip_file_size}-byte gzip blob")
        if prev is not None and e.en_pos < prev.en_pos:
            raise FormatError(path, f"entry {i} en_pos", e.en_pos, f"entries must be sorted (previous {prev.en_pos})")
        if algo == 0 and e.win_len != WINDOW:
            raise FormatError(path, f"entry {i} win_len", e.win_len, f"a raw window is {WINDOW} bytes")
        if e.win_len < 1:
            raise FormatError(path, f"entry {i} win_len", e.win_len, "must be positive")
        if not (HEADER_SIZE <= e.win_pos and e.win_pos + e.win_len <= index_start):
            raise FormatError(path, f"entry {i} win_pos", e.win_pos,
                              f"window of {e.win_len} bytes outside the window area {HEADER_SIZE}..{index_start}")
        prev = e
    fields = dict(magic=bytes(magic), major_version=major, minor_version=minor, dict_compress_algo=algo,
                  dict_compress_level=level, flag=flag, span=span, window=window, index_size=index_size,
                  index_num=index_num, gzip_file_size=gzip_file_size, index_file_size=index_file_size,
                  uncompress_file_size=uncompress_file_size, index_start=index_start,
                  index_area_len=index_area_len, crc=crc)
    index = GzIndex(path, fields, entries, bytes(data[HEADER_SIZE:index_start]))
    if check_windows and algo == 1:
        for i, e in enumerate(entries):
            raw = data[e.win_pos:e.win_pos + e.win_len]
            _inflate_exact(raw, WINDOW, path, f"entry {i} window", e.win_pos)
    return index


def open_backing(target, index, name="<gzip>", cache_slots=8, *, impl=None):
    """The core's GzipBacking over `target` (the Backing holding the .gz
    blob) through `index`, a GzIndex or an index file's path (parsed with
    load_index).  The index must be the blob's: its gzip_file_size is
    checked against target.size (FormatError naming the index file).  The
    core checks the access points again on its own terms.  impl: the core
    module to use (default tcmu_obd.core; tests pass _lsmt or its twin)."""
    if impl is None:
        from tcmu_obd import core as impl
    if isinstance(index, (str, bytes)) or hasattr(index, "__fspath__"):
        index = load_index(index, gzip_size=target.size)
    elif index.gzip_file_size != target.size:
        raise FormatError(index.path, "gzip_file_size", index.gzip_file_size,
                          f"the gzip blob {target.name} has {target.size} bytes")
    return impl.GzipBacking(target, index.access_points(), index.window_area, index.uncompress_file_size,
                            name, cache_slots, raw_windows=index.dict_compress_algo == 0)


def load_index(path, *, gzip_size=None):
    """parse_index() of the file at `path`."""
    path = os.fsdecode(path)
    with open(path, "rb") as f:
        data = f.read()
    return parse_index(data, path=path, gzip_size=gzip_size)


# ---------------------------------------------------------------- writer

class GzipIndexWriter:
    """Builds an index while the gzip blob goes through once: feed()
    compressed chunks in order and take the decompressed bytes it yields
    (e.g. to read the tar inside), then finish().  Only the first gzip member
    is indexed and decompressed; later bytes are counted (gzip_file_size)
    but not read.  The file at out_path is written as the points come and
    completed (header last) by finish(); on an error it is removed."""

    def __init__(self, out_path, *, span=DEFAULT_SPAN, level=DEFAULT_LEVEL, dict_compress_algo=1, name=None):
        from tcmu_obd.core._lsmt import GzipScanner
        if not MIN_SPAN <= span < (1 << 31):
            raise UsageError(f"span {span}: must be {MIN_SPAN}..{(1 << 31) - 1}")
        if not -1 <= level <= 9:
            raise UsageError(f"level {level}: must be -1..9")
        if dict_compress_algo not in (0, 1):
            raise UsageError(f"dict_compress_algo {dict_compress_algo}: must be 0 (raw) or 1 (zlib)")
        self.out_path = os.fsdecode(out_path)
        self.name = name or "<gzip stream>"
        self.span, self.level, self.algo = span, level, dict_compress_algo
        self._scan = GzipScanner(span)
        self._entries = []
        self._fed = 0
        self._f = open(self.out_path, "wb")
        self._f.write(bytes(HEADER_SIZE))
        self._pos = HEADER_SIZE
        self._done = False

    def _take_points(self):
        self._add_points(self._scan.points())

    def _add_points(self, points):
        """Store access points (de_pos, en_pos, bits, raw window) in order."""
        for de, en, bits, win in points:
            stored = win if self.algo == 0 else zlib.compress(win, self.level)
            self._f.write(stored)
            self._entries.append(IndexEntry(de, en, self._pos, bits, len(stored)))
            self._pos += len(stored)

    def feed(self, chunk):
        """Decompress the next compressed chunk: yields the output (pieces of
        at most 1 MiB).  Consume the generator before the next feed()."""
        if self._done:
            raise UsageError(f"{self.out_path}: feed() after finish()")
        self._fed += len(chunk)
        pos = 0
        try:
            while not self._scan.ended:
                used, out = self._scan.step(chunk, pos)
                pos += used
                self._take_points()
                if out:
                    yield out
                elif used == 0:
                    break
        except ValueError as e:
            self.abort()
            raise FormatError(self.name, "gzip data", self._scan.total_in, f"does not inflate: {e}") from None

    def write(self, chunk):
        """feed() with the output discarded."""
        for _ in self.feed(chunk):
            pass

    @property
    def ended(self):
        """True once the first member's end (and its trailer) went by."""
        return self._scan.ended

    @property
    def uncompressed_size(self):
        return self._scan.total_out

    def abort(self):
        if not self._done:
            self._done = True
            self._f.close()
            try:
                os.unlink(self.out_path)
            except FileNotFoundError:
                pass

    def finish(self, gzip_size=None):
        """Write the entry table and the header; returns the parsed index.
        gzip_size: the blob's size (default: the bytes fed)."""
        if self._done:
            raise UsageError(f"{self.out_path}: finished already")
        if not self._scan.ended:
            self.abort()
            raise FormatError(self.name, "gzip stream", self._scan.total_in,
                              "ends before the end of its first member (truncated?)")
        gzip_size = self._fed if gzip_size is None else gzip_size
        if gzip_size < self._scan.total_in:
            self.abort()
            raise FormatError(self.name, "gzip_size", gzip_size,
                              f"the first member alone is {self._scan.total_in} bytes")
        table = b"".join(_ENTRY.pack(*e) for e in self._entries)
        area = table if self.algo == 0 else zlib.compress(table, self.level)
        index_start = self._pos
        self._f.write(area)
        size = index_start + len(area)
        head = _HEAD.pack(MAGIC, 1, 0, self.algo, self.level, 0, self.span, WINDOW, ENTRY_SIZE,
                          len(self._entries), gzip_size, size, self._scan.total_out, bytes(256),
                          index_start, len(area))
        head += struct.pack("<I", _crc(head))
        self._f.seek(0)
        self._f.write(head)
        self._f.close()
        self._done = True
        with open(self.out_path, "rb") as f:
            return parse_index(f.read(), path=self.out_path, gzip_size=gzip_size)


_END = object()


class GzipIndexReader(io.RawIOBase):
    """The decompressed stream of a gzip blob, read once from the start,
    with its index written on the way by `writer` (a new GzipIndexWriter).

    A worker thread reads the blob (`raw`, any binary file object with
    readinto) in `in_size` chunks and inflates it with the writer's scanner
    (the core's GzipScanner, GIL released) into `ahead` buffers of
    `buf_size` bytes that the reader takes in turn: inflating runs ahead of
    whatever the reader does with the bytes (turboOCI-apply's ext4 metadata
    work), on the other core.  The access points' windows are compressed
    and written by the reader's thread as their buffers are reached, so the
    file is the one build_index writes.  One reader thread: read(),
    readinto(), skip(); then finish() (completes the index) or close().

    A zlib error in the worker reaches the reader, after the bytes decoded
    before it, as the same FormatError feed() raises (the index is then
    removed); a blob that ends early just ends the stream (finish() says
    so)."""

    def __init__(self, raw, writer, *, in_size=2 << 20, buf_size=4 << 20, ahead=4):
        super().__init__()
        self.raw, self.writer = raw, writer
        self.in_size, self.buf_size = in_size, buf_size
        self.fed = 0                    # compressed bytes read (the worker's count)
        self._q = queue.SimpleQueue()   # worker -> reader: (buffer, length, points), an exception, _END
        self._free = queue.SimpleQueue()
        for _ in range(max(2, ahead)):
            self._free.put(bytearray(buf_size))
        self._stop = False
        self._buf = None
        self._view = memoryview(b"")
        self._off = 0
        self._eof = False
        self._worker = threading.Thread(target=self._work, name="gzindex-inflate", daemon=True)
        self._worker.start()

    # -- the worker --------------------------------------------------------------------------------
    def _work(self):
        scan = self.writer._scan
        inbuf = bytearray(self.in_size)
        inview = memoryview(inbuf)
        inlen = inpos = 0
        eof = False
        try:
            while not (scan.ended or eof):
                out = self._free.get()
                if out is None or self._stop:
                    return
                filled, points = 0, []
                try:
                    while filled < len(out) and not scan.ended:
                        if inpos == inlen:
                            n = self.raw.readinto(inbuf)
                            if not n:
                                eof = True
                                break
                            self.fed += n
                            inlen, inpos = n, 0
                        used, made = scan.step_into(inview[:inlen], inpos, out, filled)
                        inpos += used
                        filled += made
                        points.extend(scan.points())
                        if not (used or made) and inpos < inlen:
                            raise RuntimeError("the gzip scanner made no progress")   # never: zlib errors instead
                except ValueError as e:
                    self._q.put((out, filled, points))
                    self._q.put(FormatError(self.writer.name, "gzip data", scan.total_in, f"does not inflate: {e}"))
                    return
                self._q.put((out, filled, points))
            while not self._stop:           # count the bytes after the first member (gzip_file_size)
                n = self.raw.readinto(inbuf)
                if not n:
                    break
                self.fed += n
        except BaseException as e:          # handed to the reader, raised there
            self._q.put(e)
            return
        self._q.put(_END)

    # -- the reader --------------------------------------------------------------------------------
    def _next(self):
        """The next buffer; False at the end of the stream."""
        if self._buf is not None:
            self._free.put(self._buf)
            self._buf = None
        self._view, self._off = memoryview(b""), 0
        if self._eof:
            return False
        item = self._q.get()
        if item is _END:
            self._eof = True
            return False
        if isinstance(item, BaseException):
            self._eof = True
            self.writer.abort()
            raise item
        buf, n, points = item
        self.writer._add_points(points)
        self._buf, self._view = buf, memoryview(buf)[:n]
        return True

    def readable(self):
        return True

    def readinto(self, b):
        while self._off >= len(self._view):
            if not self._next():
                return 0
        n = min(len(b), len(self._view) - self._off)
        b[:n] = self._view[self._off:self._off + n]
        self._off += n
        return n

    def read(self, n=-1):
        if n is None or n < 0:
            return self.readall()
        out = bytearray(n)
        got = 0
        while got < n:
            k = self.readinto(memoryview(out)[got:])
            if not k:
                break
            got += k
        del out[got:]
        return bytes(out)

    def skip(self, n):
        """Pass over n bytes of the stream: the number passed (less at its end)."""
        left = n
        while left:
            if self._off >= len(self._view) and not self._next():
                break
            k = min(left, len(self._view) - self._off)
            self._off += k
            left -= k
        return n - left

    def finish(self, gzip_size=None):
        """Read the rest of the stream and complete the index: writer.finish()'s
        parsed index (gzip_size: default the bytes the blob had)."""
        while self._next():
            pass
        self._worker.join()
        return self.writer.finish(self.fed if gzip_size is None else gzip_size)

    def close(self):
        """Stop the worker (it ends at its next buffer) and wait for it."""
        self._stop = True
        self._free.put(None)
        self._worker.join()
        self._view, self._buf = memoryview(b""), None
        super().close()


def build_index(src, out_path, *, span=DEFAULT_SPAN, level=DEFAULT_LEVEL, gzip_size=None, name=None):
    """Write the index of the gzip blob read (sequentially, to its end) from
    the binary file object src to out_path; returns it parsed (GzIndex)."""
    w = GzipIndexWriter(out_path, span=span, level=level,
                        name=name or getattr(src, "name", None) or "<gzip stream>")
    try:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            w.write(chunk)
    except BaseException:
        w.abort()
        raise
    return w.finish(gzip_size)
