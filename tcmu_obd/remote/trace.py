"""overlaybd's prefetch trace file and prefetch list (docs/runtime.md, Trace and prefetch).

Encodes and decodes the binary trace byte for byte (little-endian LP64
struct layout, raw CRC32C over the records including their padding), tells
which mode a trace path selects, parses the text "dynamic prefetch" file list,
and records reads in memory with overlaybd's `.lock`/`.ok` file protocol.
It does not replay anything: replay workers need the remote-layer stack and
live elsewhere; they call decode() or parse_file_list() and read the ranges.

Layout:
    header (24 bytes): u32 magic 0xC2EF1820 @0, pad[4] @4, u64 data_size @8,
                       u32 checksum @16, pad[4] @20
    record (24 bytes): u8 op ('R'/'W') @0, pad[3] @1, u32 layer_index @4,
                       u64 count @8, i64 offset @16
"""
import os
import re
import stat
import struct
import threading
from collections import namedtuple

from tcmu_obd.core import crc32c
from tcmu_obd.errors import CorruptDataError, FormatError, UsageError

MAGIC = 0xC2EF1820                 # 3270449184
HEADER = struct.Struct("<I4xQI4x")
RECORD = struct.Struct("<B3xIQq")
HEADER_SIZE = HEADER.size          # 24
RECORD_SIZE = RECORD.size          # 24
OP_READ, OP_WRITE = "R", "W"
_OPS = {ord(OP_READ): OP_READ, ord(OP_WRITE): OP_WRITE}
MAX_LIST_SIZE = 64 * 1024
MAX_IO_SIZE = 1 << 20              # replay reads at most this much per pread

MODE_DISABLED, MODE_RECORD, MODE_REPLAY, MODE_FILELIST = "disabled", "record", "replay", "filelist"

TraceRecord = namedtuple("TraceRecord", "op layer_index count offset")
TraceRecord.__doc__ = """One traced access: op 'R' or 'W', the layer's index in
`lowers` (0 = bottom), and a byte range of that layer's LSMT blob."""


# ------------------------------------------------------------------ binary format
def _check_record(i, rec):
    op, layer, count, offset = rec
    if op not in (OP_READ, OP_WRITE):
        raise UsageError(f"trace record {i}: op {op!r} is not 'R' or 'W'")
    if not (isinstance(layer, int) and 0 <= layer < 2**32):
        raise UsageError(f"trace record {i}: layer_index {layer!r} is not a u32")
    if not (isinstance(count, int) and 0 <= count < 2**64):
        raise UsageError(f"trace record {i}: count {count!r} is not a u64")
    if not (isinstance(offset, int) and 0 <= offset < 2**63):
        raise UsageError(f"trace record {i}: offset {offset!r} is not a non-negative i64")


def encode_records(records):
    """The record bytes only (padding zeroed)."""
    out = bytearray(RECORD_SIZE * len(records))
    for i, rec in enumerate(records):
        _check_record(i, rec)
        RECORD.pack_into(out, i * RECORD_SIZE, ord(rec[0]), rec[1], rec[2], rec[3])
    return bytes(out)


def encode_header(data_size, checksum):
    return HEADER.pack(MAGIC, data_size, checksum)


def encode(records):
    """A whole trace file: header with data_size and checksum, then records."""
    body = encode_records(list(records))
    return encode_header(len(body), checksum(body)) + body


def checksum(body):
    """Raw CRC32C chained over each 24-byte record from 0.  Chaining a raw
    (non-inverted) CRC record by record equals one CRC over the whole body."""
    return crc32c(body, 0)


def decode(data, path="<trace>"):
    """Parse and verify a trace file's bytes; FormatError names the bad field.

    Checks, in order: size >= header, magic, data_size (a multiple of 24 and
    == file size - 24), checksum over the records exactly as stored (padding
    included, so non-zero padding is accepted if the CRC covered it), then
    each record's op ('R'/'W') and offset (>= 0).  The header's padding is
    not checked; overlaybd does not look at it either."""
    mv = memoryview(data).cast("B")
    size = len(mv)
    if size < HEADER_SIZE:
        raise FormatError(path, "size", size, f"shorter than the {HEADER_SIZE}-byte trace header")
    magic, data_size, stored = HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise FormatError(path, "magic", magic, f"not the trace magic 0x{MAGIC:08x}")
    if data_size % RECORD_SIZE:
        raise FormatError(path, "data_size", data_size,
                          f"not a multiple of the {RECORD_SIZE}-byte record size")
    if size != HEADER_SIZE + data_size:
        raise FormatError(path, "data_size", data_size,
                          f"the file holds {size - HEADER_SIZE} bytes after the header")
    body = mv[HEADER_SIZE:]
    actual = checksum(body)
    if actual != stored:
        raise CorruptDataError(path, "checksum", stored, f"the records' CRC32C is 0x{actual:08x}")
    out = []
    for i, (op, layer, count, offset) in enumerate(RECORD.iter_unpack(body)):
        name = _OPS.get(op)
        if name is None:
            raise FormatError(path, f"records[{i}].op", op, "not 'R' (0x52) or 'W' (0x57)")
        if offset < 0:
            raise FormatError(path, f"records[{i}].offset", offset, "negative")
        out.append(TraceRecord(name, layer, count, offset))
    return out


def read(path):
    """decode() the file at path."""
    with open(path, "rb") as f:
        return decode(f.read(), path)


# ------------------------------------------------------------------ mode selection
def detect_mode(path):
    """What a trace path asks for: "disabled" (missing, not a regular file, or
    unreadable), "record" (empty file), "replay" (starts with the 4-byte
    trace magic, even if shorter than a header: decode() then reports it),
    or "filelist" (any other non-empty file)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return MODE_DISABLED
    if not stat.S_ISREG(st.st_mode):
        return MODE_DISABLED
    if st.st_size == 0:
        return MODE_RECORD
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return MODE_DISABLED
    if len(head) == 4 and struct.unpack("<I", head)[0] == MAGIC:
        return MODE_REPLAY
    return MODE_FILELIST


# ------------------------------------------------------------------ file list
_NAME = r"[A-Za-z0-9_.+@%,:=~-]+"
LIST_LINE = re.compile(rf"/(?:{_NAME}(?:/{_NAME})*(?:/\*?)?|\*)?")


def parse_file_list(data, path="<prefetch list>"):
    """Parse a dynamic prefetch list into [(absolute path, recursive)].

    The file may hold at most 64 KiB (else FormatError on "size").  Each line
    is stripped of surrounding whitespace; empty lines and lines that do not
    fully match LIST_LINE are dropped:

        /(?:NAME(?:/NAME)*(?:/\\*?)?|\\*)?     NAME = [A-Za-z0-9_.+@%,:=~-]+

    i.e. an absolute path of plain names separated by single slashes,
    optionally ending in "/" or "/*", which both mean "recurse into this
    directory" ("/" alone and "/*" mean the whole image).  A component "."
    or ".." drops the line too.  "*" is accepted only as a whole last
    component: "/usr/lib/libc*" is not a glob and is dropped.  Returned paths
    carry no trailing "/" or "/*" (except the root "/"); order and
    duplicates are kept."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > MAX_LIST_SIZE:
        raise FormatError(path, "size", len(data), f"a prefetch list holds at most {MAX_LIST_SIZE} bytes")
    text = bytes(data).decode("utf-8", "replace")
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or not LIST_LINE.fullmatch(line):
            continue
        recursive = line.endswith("/") or line.endswith("*")
        if line.endswith("*"):
            line = line[:-1]
        line = line.rstrip("/")
        if any(part in (".", "..") for part in line.split("/")):
            continue
        out.append((line or "/", recursive))
    return out


# ------------------------------------------------------------------ recording
class TraceRecorder:
    """Collects the reads of one device in memory and dumps them as a trace.

    Protocol (as overlaybd): start(path) creates `<path>.lock`; recording
    stops when a user deletes that file (poll() returns True; watch() polls
    every second in a thread) or when the device closes.  finish() then
    writes the header with a zero checksum, the records, rewrites the header
    with the checksum, removes `.lock` and creates `<path>.ok`.
    add() is thread-safe and ignored once recording has stopped.
    """

    POLL_INTERVAL = 1.0

    def __init__(self):
        self.path = None
        self._records = []
        self._mutex = threading.Lock()
        self._finish_lock = threading.Lock()
        self._stopped = False
        self._finished = False
        self._watch_stop = threading.Event()
        self._watcher = None

    @property
    def lock_path(self):
        return self.path + ".lock"

    @property
    def ok_path(self):
        return self.path + ".ok"

    @property
    def stopped(self):
        return self._stopped

    @property
    def finished(self):
        return self._finished

    def start(self, path):
        """Begin recording into `path` (normally an existing empty file)."""
        if self.path is not None:
            raise UsageError(f"trace recorder already started on {self.path}")
        path = os.fspath(path)
        os.close(os.open(path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
        self.path = path
        return self

    def add(self, layer_index, offset, count, op=OP_READ):
        """Append one successful full-length read of layer `layer_index`."""
        rec = TraceRecord(op, layer_index, count, offset)
        _check_record(len(self._records), rec)
        with self._mutex:
            if not self._stopped:
                self._records.append(rec)

    def records(self):
        with self._mutex:
            return list(self._records)

    def __len__(self):
        return len(self._records)

    def stop(self):
        """Stop accepting records (finish() also does this)."""
        with self._mutex:
            self._stopped = True

    def poll(self):
        """True once the lock file has been deleted (recording then stops)."""
        if self.path is None or self._finished:
            return False
        if os.path.lexists(self.lock_path):
            return False
        self.stop()
        return True

    def watch(self, interval=None):
        """Poll in a daemon thread and finish() when the lock file goes."""
        if self.path is None:
            raise UsageError("trace recorder: watch() before start()")
        interval = self.POLL_INTERVAL if interval is None else interval

        def loop():
            while not self._watch_stop.wait(interval):
                if self.poll():
                    try:
                        self.finish()
                    except OSError:
                        pass          # the trace file is left empty; nothing else to do
                    return

        self._watcher = threading.Thread(target=loop, name=f"trace-watch {self.path}", daemon=True)
        self._watcher.start()
        return self._watcher

    def close(self):
        """The device is closing: stop the watcher and dump if not done yet."""
        self._watch_stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        if self.path is not None:
            self.finish()

    def finish(self):
        """Dump the trace and switch `.lock` for `.ok`; returns the number of
        records written (None if already finished).  On a write error the
        trace file is truncated to 0 and the OSError propagates; `.lock`
        stays, as in overlaybd."""
        if self.path is None:
            raise UsageError("trace recorder: finish() before start()")
        with self._finish_lock:
            if self._finished:
                return None
            self.stop()
            records = self.records()
            body = encode_records(records)
            try:
                os.unlink(self.ok_path)          # a stale .ok must not announce this dump early
            except FileNotFoundError:
                pass
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                try:
                    _write_all(fd, encode_header(len(body), 0), 0)
                    _write_all(fd, body, HEADER_SIZE)
                    _write_all(fd, encode_header(len(body), checksum(body)), 0)
                    os.fsync(fd)
                except OSError:
                    try:
                        os.ftruncate(fd, 0)
                    except OSError:
                        pass
                    raise
            finally:
                os.close(fd)
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
            os.close(os.open(self.ok_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
            self._finished = True
            return len(records)


def _write_all(fd, data, offset):
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        if n <= 0:
            raise OSError(f"short write at offset {offset}")
        mv, offset = mv[n:], offset + n
