"""The optional tar wrapper around an overlaybd layer blob.

A native overlaybd layer is usually a one-entry tar whose payload is a zfile.
This module finds that payload inside a blob (detect, unwrap) the way overlaybd
does, and writes the wrapper the way `overlaybd-commit -t` does (TarWriter,
wrap_file).  It is not a general tar library: it reads only the first entry,
accepts only the two header layouts overlaybd can read (payload at 512, or at
1536 after one PAX header with one data block), and never extracts anything.
A blob that does not start with a valid ustar header is not an error: it is a
raw payload and detect() returns None.
"""

import grp
import os
import pwd
import re
import shutil

from tcmu_obd.errors import FormatError

BLOCK = 512
HEADER_SIZE = 3 * BLOCK          # PAX header + PAX data + ustar header
PAYLOAD_NAME = "overlaybd.commit"
_EXTENSIONS = {ord("x"), ord("g"), ord("L"), ord("K")}
_REGULAR = {ord("0"), 0}


def _round_up(n, to=BLOCK):
    return (n + to - 1) // to * to


def _block(read_at, offset, size):
    """The 512 bytes at offset, or None if the blob ends before them."""
    if offset + BLOCK > size:
        return None
    data = bytes(read_at(offset, BLOCK))[:BLOCK]
    return data if len(data) == BLOCK else None


def _checksums(hdr):
    """Unsigned and signed byte sums of hdr with the chksum field as spaces."""
    body = hdr[:148] + b" " * 8 + hdr[156:]
    unsigned = sum(body)
    return unsigned, unsigned - 256 * sum(1 for b in body if b >= 128)


def _checksum_ok(hdr):
    """overlaybd reads chksum like sscanf("%o"): leading blanks, then digits."""
    stored = re.match(rb"[ \t\n\r\v\f]*([0-7]+)", hdr[148:156])
    return stored is not None and int(stored[1], 8) in _checksums(hdr)


def _is_ustar(hdr):
    return hdr[257:262] == b"ustar" and hdr[263:265] == b"00" and _checksum_ok(hdr)


def _octal(hdr, start, end, field, path):
    """A numeric header field: octal digits, space/NUL padded; empty is 0."""
    raw = hdr[start:end]
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if raw[0] & 0x80 or any(c < 0x30 or c > 0x37 for c in text):
        raise FormatError(path, field, raw, "not an octal number")
    return int(text, 8)


def _pax_records(data, path):
    """Parse "<len> key=value\\n" records into a dict of bytes (last wins)."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise FormatError(path, "pax record", data[pos:pos + 32],
                              f"record at byte {pos} has no decimal length")
        end = pos + int(digits)
        if end > len(data) or end <= space + 1 or data[end - 1] != 0x0A:
            raise FormatError(path, "pax record", data[pos:pos + 32],
                              f"length {int(digits)} at byte {pos} does not end on a newline "
                              f"inside the {len(data)}-byte PAX data")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise FormatError(path, "pax record", data[pos:end], "no key=value")
        records[key] = value
        pos = end
    return records


def detect(read_at, size, path):
    """Find the payload of a tar-wrapped layer blob.

    read_at(offset, length) -> bytes reads the blob, size is its length and
    path names it in errors.  Returns (payload_offset, payload_size), or None
    when the first 512 bytes are not a valid ustar header (a raw blob).
    Raises FormatError when the blob is a tar that overlaybd cannot read.
    """
    first = _block(read_at, 0, size)
    if first is None or not _is_ustar(first):
        if first is not None and first.startswith(b"overlaybd.pax\0"):
            third = _block(read_at, 2 * BLOCK, size)
            if third is not None and third[257:265] == b"xxtar\0xx":
                raise FormatError(path, "magic", third[257:263],
                                  "unfinished overlaybd tar (the writer was never closed)")
        return None
    off, hdr, pax_seen, pax_size = 0, first, False, None
    while hdr[156] in _EXTENSIONS:
        kind = chr(hdr[156])
        length = _octal(hdr, 124, 136, "size", path)
        data_off = off + BLOCK
        off = data_off + _round_up(length)
        if off > 2 * BLOCK:
            raise FormatError(path, "typeflag", kind,
                              "extension headers longer than one PAX header and one data "
                              "block; overlaybd would read the payload at the wrong offset")
        if off + BLOCK > size:
            raise FormatError(path, "size", length,
                              f"truncated: '{kind}' header and its entry need more than {off} bytes, "
                              f"the blob has {size}")
        data = bytes(read_at(data_off, length))[:length]
        if len(data) != length:
            raise FormatError(path, "size", length, f"short read of '{kind}' data")
        if kind in "xg":
            pax_seen = True
            records = _pax_records(data, path)
            if kind == "x" and b"size" in records:
                value = records[b"size"]
                if not value.isdigit():
                    raise FormatError(path, "pax size", value, "not a decimal number")
                pax_size = int(value)
        hdr = _block(read_at, off, size)
        if hdr is None or not any(hdr):
            raise FormatError(path, "typeflag", kind, "extension header is not followed by an entry")
        if not _checksum_ok(hdr):
            raise FormatError(path, "chksum", hdr[148:156],
                              f"header at byte {off} fails its checksum")
    payload_offset = off + BLOCK
    expected = HEADER_SIZE if pax_seen else BLOCK
    if payload_offset != expected:
        raise FormatError(path, "payload offset", payload_offset,
                          f"overlaybd reads this layout's payload at {expected}")
    if hdr[156] not in _REGULAR:
        raise FormatError(path, "typeflag", chr(hdr[156]), "entry is not a regular file")
    field_size = _octal(hdr, 124, 136, "size", path)
    payload_size = pax_size if pax_size else field_size
    if payload_offset + payload_size > size:
        raise FormatError(path, "size", payload_size,
                          f"truncated: the entry at byte {payload_offset} needs "
                          f"{payload_offset + payload_size} bytes, the blob has {size}")
    return payload_offset, payload_size


def unwrap(read_at, size, path):
    """(offset, length) of the payload: the whole blob if it is not a tar."""
    found = detect(read_at, size, path)
    return found if found is not None else (0, size)


def file_reader(fileobj):
    """A read_at callable over an open local file (positional reads)."""
    fd = fileobj.fileno()
    return lambda offset, length: os.pread(fd, length, offset)


# ---- writing ---------------------------------------------------------------

def _oct(value, width):
    """8 bytes: "%6lo" + space + NUL; 12 bytes (size, mtime): "%11lo" + space."""
    text = b"%6o \0" % value if width == 8 else b"%11o " % value
    if len(text) != width:
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return text


def _header(name, typeflag, size, magic=b"ustar\0", version=b"00", mode=None,
            uname=b"", gname=b"", owner=False, checksum=True):
    """One 512-byte header; fields not asked for stay NUL."""
    h = bytearray(BLOCK)
    name, uname, gname = name[:99], uname[:31], gname[:31]
    h[0:len(name)] = name
    if mode is not None:
        h[100:108] = _oct(mode, 8)
    if owner:
        h[108:116] = _oct(0, 8)
        h[116:124] = _oct(0, 8)
        h[136:148] = _oct(0, 12)
    h[124:136] = _oct(size, 12)
    h[156] = ord(typeflag)
    h[257:257 + len(magic)] = magic
    h[263:265] = version
    h[265:265 + len(uname)] = uname
    h[297:297 + len(gname)] = gname
    if checksum:
        h[148:156] = _oct(_checksums(h)[0], 8)
    return bytes(h)


def pax_size_record(payload_size):
    """The record "<L> size=<S>\\n", L counting the whole record."""
    body = b" size=%d\n" % payload_size
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length = len(b"%d" % length) + len(body)
    return b"%d" % length + body


def _name_of_zero(lookup, attr):
    try:
        return getattr(lookup(0), attr).encode()
    except (KeyError, UnicodeError):
        return b"root"


def wrapper_header(payload_size, mode, uname=None, gname=None):
    """The final first 1536 bytes of a wrapped blob."""
    record = pax_size_record(payload_size)
    pax = _header(b"overlaybd.pax", "x", len(record))
    if uname is None:
        uname = _name_of_zero(pwd.getpwuid, "pw_name")
    if gname is None:
        gname = _name_of_zero(grp.getgrgid, "gr_name")
    entry = _header(PAYLOAD_NAME.encode(), "0", 0, mode=mode, uname=uname,
                    gname=gname, owner=True)
    return pax + record.ljust(BLOCK, b"\0") + entry


class TarWriter:
    """Streams one payload into overlaybd's "new tar" wrapper.

    fileobj must be a writable, seekable real file; it is truncated and starts
    with a placeholder until close() writes the real header and the trailer.
    mode/uname/gname override what goes into the entry header (by default the
    output file's st_mode and the names of uid/gid 0) for reproducible bytes.
    """

    def __init__(self, fileobj, mode=None, uname=None, gname=None):
        self._f, self._mode, self._uname, self._gname = fileobj, mode, uname, gname
        self.size, self.closed = 0, False
        record = pax_size_record(0)
        self._f.seek(0)
        self._f.truncate()
        self._f.write(_header(b"overlaybd.pax", "x", len(record), magic=b"", version=b"\0\0",
                              checksum=False)
                      + record.ljust(BLOCK, b"\0")
                      + _header(b"overlaybd.new", "\0", 0, magic=b"xxtar\0", version=b"xx",
                                checksum=False))

    def write(self, data):
        """Append payload bytes; returns how many were written."""
        if self.closed:
            raise ValueError("write to a closed TarWriter")
        n = memoryview(data).nbytes
        self._f.write(data)
        self.size += n
        return n

    def close(self):
        """Write the trailer (after a hole up to a block boundary) and the header."""
        if self.closed:
            return
        self.closed = True
        end = _round_up(HEADER_SIZE + self.size)
        self._f.flush()
        self._f.truncate(end)
        self._f.seek(end)
        self._f.write(bytes(2 * BLOCK))
        self._f.flush()
        mode = self._mode if self._mode is not None else os.fstat(self._f.fileno()).st_mode
        self._f.seek(0)
        self._f.write(wrapper_header(self.size, mode, self._uname, self._gname))
        self._f.seek(0, os.SEEK_END)
        self._f.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()


def wrap_file(src_path, dst_path, mode=None, chunk=1 << 20):
    """Write src_path's bytes to dst_path inside the tar wrapper."""
    with open(src_path, "rb") as src, open(dst_path, "w+b") as dst:
        with TarWriter(dst, mode=mode) as writer:
            shutil.copyfileobj(src, writer, chunk)
