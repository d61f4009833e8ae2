"""Writable (RW) LSMT layers: the append-only data+index pair and the sparse
data file (docs/formats.md: Append-only, Sparse and Sealed layers).

Creates, reopens (index replay, or SEEK_DATA/SEEK_HOLE rebuild), writes,
discards, syncs, resizes and seals.  Reads go through the core Stack built
by tcmu_obd.image.stack over `backing` and `index`; committing lives in
tcmu_obd.image.commit.  Not the read-only layers (image.layer).
"""
import errno
import os
import struct
import threading

from tcmu_obd import core
from tcmu_obd.core.fileio import punch_hole, pwrite_all
from tcmu_obd.format import lsmt
from tcmu_obd.errors import FormatError, UsageError
from tcmu_obd.format.lsmt import (FLAG_DATA, FLAG_HEADER, FLAG_SEALED, FLAG_SPARSE, HT_SPACE, MAX_INDEX, MAX_IO,
                                  MAX_LENGTH, SECTOR, LsmtHeader)

_REC = struct.Struct("<QQ")
_VSIZE_AT = 48


def encode_record(offset, length, moffset, zeroed=0, tag=0):
    return _REC.pack(offset | (length << 50), moffset | (zeroed << 55) | (tag << 56))


class RWLayer:
    """An open writable layer.  `index` holds its records (tag 0); the
    stack maps them to `backing`, the data file."""

    def __init__(self, data_path, index_path, data_fd, index_fd, header, vsize, sparse, index):
        self.data_path = data_path
        self.index_path = index_path
        self.data_fd = data_fd
        self.index_fd = index_fd
        self.header = header
        self.vsize = vsize
        self.sparse = sparse
        self.index = index
        self.lock = threading.Lock()
        # A torn append can leave the data file at an unaligned size; the next
        # payload must start on a sector boundary or its record's moffset
        # (data_end // 512) would point before it.
        self.data_end = -(-os.fstat(data_fd).st_size // SECTOR) * SECTOR
        self.index_end = os.fstat(index_fd).st_size if index_fd >= 0 else 0
        # Reads of the data file are bounded by the records; its size grows.
        self.backing = core.RawBacking(data_fd, 0, 1 << 62, data_path)

    # ------------------------------------------------------------ create/open
    @classmethod
    def create(cls, data_path, index_path, vsize, parent_uuid=None, sparse=False, user_tag=b""):
        """overlaybd-create: both files O_EXCL, mode 0644."""
        uid = lsmt.random_uuid()
        parent = lsmt.uuid_text(parent_uuid or "")
        dfd, ifd = create_exclusive(data_path, index_path)
        try:
            dflags = FLAG_HEADER | FLAG_DATA | (FLAG_SPARSE if sparse else 0)
            os.pwrite(dfd, LsmtHeader(dflags, 0, 0, vsize, uid, parent, user_tag).pack(), 0)
            if sparse:
                os.ftruncate(dfd, vsize + HT_SPACE)
            else:
                os.pwrite(ifd, LsmtHeader(FLAG_HEADER, HT_SPACE, 0, vsize, uid, parent, user_tag).pack(), 0)
        finally:
            os.close(dfd)
            os.close(ifd)
        return cls.open(data_path, index_path)

    @classmethod
    def open(cls, data_path, index_path):
        data_path, index_path = os.fspath(data_path), os.fspath(index_path) if index_path else ""
        dfd = os.open(data_path, os.O_RDWR | os.O_CLOEXEC)
        ifd = -1
        try:
            raw = os.pread(dfd, HT_SPACE, 0)
            if len(raw) < HT_SPACE:
                raise FormatError(data_path, "file size", len(raw),
                                  f"shorter than the {HT_SPACE}-byte LSMT header")
            hdr = LsmtHeader.unpack(raw, data_path, "header")
            if not hdr.is_header:
                raise FormatError(data_path, "header flags", hdr.flags, "HEADER bit (0x1) is clear")
            if hdr.is_sparse:
                index = _sparse_index(dfd, data_path)
                return cls(data_path, index_path, dfd, -1, hdr, hdr.virtual_size, True, index)
            if not index_path:
                raise UsageError(f"{data_path}: an append-only RW layer needs its index file")
            ifd = os.open(index_path, os.O_RDWR | os.O_CLOEXEC)
            ihdr, count = read_index_file(ifd, index_path, "an RW")
            index = core.Index()
            index.replay(os.pread(ifd, count * 16, HT_SPACE))
            dsize = os.fstat(dfd).st_size
            lsmt.check_index(index, index_path, 8, dsize // SECTOR,
                             f"the data file {data_path} ({dsize} bytes)")
            layer = cls(data_path, index_path, dfd, ifd, ihdr, ihdr.virtual_size, False, index)
            # a torn last record (crash mid-append) is ignored and overwritten
            layer.index_end = HT_SPACE + count * 16
            return layer
        except BaseException:
            os.close(dfd)
            if ifd >= 0:
                os.close(ifd)
            raise

    # ------------------------------------------------------------ writing
    def write(self, data, offset):
        """Write bytes at a 512-aligned offset (split at 4 MiB, one record each)."""
        n = len(data)
        _check_aligned(offset, n)
        with self.lock:
            if n <= MAX_IO:                 # the common case: no slicing
                if n:
                    self._write_piece(data, offset)
            else:
                view = memoryview(data)
                for pos in range(0, n, MAX_IO):
                    self._write_piece(view[pos:pos + MAX_IO], offset + pos)
            if offset + n > self.vsize:
                self.vsize = offset + n
        return n

    def _write_piece(self, piece, offset):
        sectors = len(piece) // SECTOR
        if self.sparse:
            at = HT_SPACE + offset
            pwrite_all(self.data_fd, piece, at)
            self.index.insert(offset // SECTOR, sectors, at // SECTOR, False, 0)
            self.data_end = max(self.data_end, at + len(piece))
            return
        at = self.data_end
        pwrite_all(self.data_fd, piece, at)
        self.data_end = at + len(piece)
        self._append_record(offset // SECTOR, sectors, at // SECTOR, 0)

    def _append_record(self, off, length, moff, zeroed):
        rec = _REC.pack(off | (length << 50), moff | (zeroed << 55))     # encode_record, tag 0
        pwrite_all(self.index_fd, rec, self.index_end)
        self.index_end += 16
        self.index.insert(off, length, moff, bool(zeroed), 0)

    def discard(self, offset, length):
        """Zero a 512-aligned range: zeroed records (append) or a punched hole (sparse)."""
        _check_aligned(offset, length)
        with self.lock:
            s, left = offset // SECTOR, length // SECTOR
            while left:
                n = min(left, MAX_LENGTH)
                if self.sparse:
                    self.index.insert(s, n, (HT_SPACE // SECTOR) + s, True, 0)
                    punch_hole(self.data_fd, HT_SPACE + s * SECTOR, n * SECTOR)
                else:
                    self._append_record(s, n, self.data_end // SECTOR, 1)
                s += n
                left -= n

    def fsync(self):
        """Data first, then the index: an acknowledged write survives a crash."""
        os.fsync(self.data_fd)
        if self.index_fd >= 0:
            os.fsync(self.index_fd)

    def update_vsize(self, vsize):
        """Rewrite virtual_size in both headers (sparse: header + ftruncate)."""
        with self.lock:
            field = struct.pack("<Q", vsize)
            os.pwrite(self.data_fd, field, _VSIZE_AT)
            if self.sparse:
                os.ftruncate(self.data_fd, vsize + HT_SPACE)
            elif self.index_fd >= 0:
                os.pwrite(self.index_fd, field, _VSIZE_AT)
            self.vsize = vsize
            self.header.virtual_size = vsize

    def seal(self):
        """close_seal: append the sorted index and a trailer to the data file
        in place, making it a read-only layer (docs/formats.md, Sealed layer)."""
        if self.sparse:
            raise UsageError(f"{self.data_path}: a sparse layer cannot be sealed; commit it")
        with self.lock:
            hdr = LsmtHeader.unpack(os.pread(self.data_fd, HT_SPACE, 0), self.data_path)
            ioff = self.data_end
            dump = self.index.dump(32)       # zero records pad to 512 bytes
            at = _sealed_at(self.data_fd, hdr, dump)
            if at is not None:
                raise UsageError(f"{self.data_path}: already sealed (its trailer at byte {at} holds "
                                 "this index); sealing again would append a second copy")
            real = len(self.index)
            pwrite_all(self.data_fd, dump, ioff)
            trailer = LsmtHeader(FLAG_DATA | FLAG_SEALED, ioff, real, self.vsize, hdr.uuid, hdr.parent_uuid)
            pwrite_all(self.data_fd, trailer.pack(), ioff + len(dump))
            os.fsync(self.data_fd)

    def close(self):
        for fd in (self.data_fd, self.index_fd):
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.index_fd = -1


def create_exclusive(first, second):
    """Create both files O_EXCL, mode 0644, in this order (an RW layer's data
    and index files, a warp layer's index and fsmeta); when the second cannot
    be made the first is removed again.  Returns the two fds, read-write."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd1 = os.open(first, flags, 0o644)
    try:
        fd2 = os.open(second, flags, 0o644)
    except OSError:
        os.close(fd1)
        os.unlink(first)
        raise
    return fd1, fd2


def read_index_file(fd, path, kind):
    """The header and record count of an open writable index file (RW or
    warp: `kind` names it in errors): at least a 4 KiB header, HEADER set,
    TYPE_DATA and SEALED clear, records from byte 4096, at most MAX_INDEX."""
    raw = os.pread(fd, HT_SPACE, 0)
    if len(raw) < HT_SPACE:
        raise FormatError(path, "file size", len(raw), f"shorter than the {HT_SPACE}-byte LSMT index-file header")
    hdr = LsmtHeader.unpack(raw, path, "header")
    if not hdr.is_header or hdr.is_data or hdr.is_sealed:
        raise FormatError(path, "header flags", hdr.flags,
                          f"{kind} index file needs HEADER set and TYPE_DATA, SEALED clear")
    if hdr.index_offset != HT_SPACE:
        raise FormatError(path, "header index_offset", hdr.index_offset, f"must be {HT_SPACE}")
    count = (os.fstat(fd).st_size - HT_SPACE) // 16
    if count > MAX_INDEX:
        raise FormatError(path, "record count", count, f"more than {MAX_INDEX}")
    return hdr, count


def _check_aligned(offset, length):
    if offset % SECTOR or length % SECTOR:
        raise UsageError(f"I/O of {length} bytes at {offset} is not 512-byte aligned")




def _sealed_at(fd, hdr, dump):
    """Where the file's seal trailer is when the file already ends with this
    layer's seal of exactly `dump` (trailer flags DATA|SEALED, the header's
    UUID, the index right before it); else None.  User data cannot pass for
    it: that index would have to be the file's own."""
    size = os.fstat(fd).st_size
    at = size - HT_SPACE
    if at < HT_SPACE + len(dump):
        return None
    raw = os.pread(fd, HT_SPACE, at)
    if not lsmt.is_lsmt(raw):
        return None
    t = LsmtHeader.unpack(raw, "<trailer>", "trailer")
    if (t.flags & (FLAG_HEADER | FLAG_DATA | FLAG_SEALED) != FLAG_DATA | FLAG_SEALED or t.uuid != hdr.uuid
            or t.index_offset + len(dump) != at or os.pread(fd, len(dump), t.index_offset) != dump):
        return None
    return at


def _sparse_index(fd, path):
    """Rebuild a sparse layer's index from its allocation map."""
    index = core.Index()
    size = os.fstat(fd).st_size
    pos = HT_SPACE
    while pos < size:
        try:
            b = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        e_ = os.lseek(fd, b, os.SEEK_HOLE)
        b -= b % SECTOR
        s = (b - HT_SPACE) // SECTOR
        left = (e_ - b + SECTOR - 1) // SECTOR
        while left:
            n = min(left, MAX_LENGTH)
            index.insert(s, n, (HT_SPACE // SECTOR) + s, False, 0)
            s += n
            left -= n
        pos = e_
    return index
