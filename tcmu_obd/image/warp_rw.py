"""The writable TurboOCI "warp" layer of the build tools (docs/formats.md,
Writable warp layer): overlaybd-create --turboOCI makes it, turboOCI-apply
writes the file system's metadata into it and maps file contents to the
layer's tar, overlaybd-commit --turboOCI turns it into a committed meta layer.

Two files: `fsmeta`, a raw sparse file of vsize bytes that metadata writes go
to at the same offset (identity), and an LSMT index file (4 KiB header, then
appended 16-byte records): tag 0 = identity record into fsmeta, tag 1 =
remote record whose moffset is a sector of the target (the uncompressed tar).
Reads go through the core Stack (tcmu_obd.image.stack with upper_files=2):
tag 0 from fsmeta, tag 1 from the target, or zeros when there is none.

It is not a layer the daemon serves (config.v1.json refuses upper.target
there), and it does not commit itself (tcmu_obd.image.commit.compact with
remote_tag=1 does).
"""
import logging
import os
import struct
import threading

from tcmu_obd import core
from tcmu_obd.core.fileio import punch_hole, pwrite_all
from tcmu_obd.errors import FormatError, UsageError
from tcmu_obd.format import gzindex, lsmt
from tcmu_obd.format.lsmt import FLAG_HEADER, HT_SPACE, MAX_IO, MAX_LENGTH, SECTOR, LsmtHeader
from tcmu_obd.image.rw import create_exclusive, read_index_file

log = logging.getLogger(__name__)
TAG_META = 0       # data in fsmeta, at the same offset
TAG_REMOTE = 1     # data in the target at moffset * 512
_REC = struct.Struct("<QQ")


def _record(off, length, moff, tag):
    return _REC.pack(off | (length << 50), moff | (tag << 56))


class WarpRWLayer:
    """An open writable warp layer; `index` holds its records (tags 0 and 1)."""

    def __init__(self, fsmeta_path, index_path, fsmeta_fd, index_fd, header, index, target_path,
                 gzip_index=None):
        self.data_path = fsmeta_path
        self.index_path = index_path
        self.data_fd = fsmeta_fd
        self.index_fd = index_fd
        self.header = header
        self.vsize = header.virtual_size
        self.index = index
        self.target_path = target_path
        self.lock = threading.Lock()
        self.index_end = HT_SPACE      # set by open()
        self.backing = core.RawBacking(fsmeta_fd, 0, self.vsize, fsmeta_path)
        self._target_fd = -1
        self.target_backing = self._open_target(target_path, gzip_index)

    # ------------------------------------------------------------ create/open
    @classmethod
    def create(cls, fsmeta_path, index_path, vsize, uuid="", parent_uuid="", target_path=None):
        """overlaybd-create --turboOCI: the index file's 4 KiB header and a
        sparse fsmeta of vsize bytes; both O_EXCL, mode 0644."""
        if vsize <= 0 or vsize % SECTOR:
            raise UsageError(f"warp layer vsize {vsize}: must be a positive multiple of {SECTOR}")
        uid = lsmt.uuid_text(uuid or "")
        parent = lsmt.uuid_text(parent_uuid or "")
        ifd, dfd = create_exclusive(index_path, fsmeta_path)
        try:
            os.ftruncate(dfd, vsize)
            pwrite_all(ifd, LsmtHeader(FLAG_HEADER, HT_SPACE, 0, vsize, uid, parent).pack(), 0)
        finally:
            os.close(dfd)
            os.close(ifd)
        return cls.open(fsmeta_path, index_path, target_path)

    @classmethod
    def open(cls, fsmeta_path, index_path, target_path=None, gzip_index=None):
        fsmeta_path, index_path = os.fspath(fsmeta_path), os.fspath(index_path)
        ifd = os.open(index_path, os.O_RDWR | os.O_CLOEXEC)
        dfd = -1
        try:
            hdr, count = read_index_file(ifd, index_path, "a warp")
            if hdr.virtual_size <= 0 or hdr.virtual_size % SECTOR:
                raise FormatError(index_path, "header virtual_size", hdr.virtual_size,
                                  f"a warp layer needs a positive multiple of {SECTOR}")
            dfd = os.open(fsmeta_path, os.O_RDWR | os.O_CLOEXEC)
            dsize = os.fstat(dfd).st_size
            if dsize < hdr.virtual_size:
                raise FormatError(fsmeta_path, "file size", dsize,
                                  f"smaller than the warp layer's virtual_size {hdr.virtual_size} "
                                  f"(from {index_path})")
            body = os.pread(ifd, count * 16, HT_SPACE)
            index = core.Index()
            for off, length, moff, tag in _check_records(body, index_path, hdr.virtual_size):
                index.insert(off, length, moff, False, tag)     # Index.replay would drop the tags
            layer = cls(fsmeta_path, index_path, dfd, ifd, hdr, index, target_path, gzip_index)
            layer.index_end = HT_SPACE + count * 16       # a torn last record is overwritten
            return layer
        except BaseException:
            os.close(ifd)
            if dfd >= 0:
                os.close(dfd)
            raise

    def _open_target(self, path, gzip_index):
        """The target as a Backing (the uncompressed view through gzip_index
        when given).  None, an empty file (the snapshotter's fake_target) or a
        gzip blob without its index reads as zeros: the tools never read the
        mapped contents, and zeros are not taken for tar bytes."""
        if path:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise UsageError(f"warp upper target {path}: cannot open: {e.strerror}") from None
            size = os.fstat(fd).st_size
            raw = core.RawBacking(fd, 0, size, path) if size else None
            if raw is not None and gzip_index:
                self._target_fd = fd
                return gzindex.open_backing(raw, gzip_index, path)
            if raw is not None and os.pread(fd, 2, 0) != b"\x1f\x8b":
                self._target_fd = fd
                return raw
            if raw is not None:
                log.info("%s: a gzip target without upper.gzipIndex: its mapped contents read as "
                         "zeros through this upper", path)
            os.close(fd)
        self._target_fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        return core.RawBacking(self._target_fd, 0, 1 << 62, "<no target: zeros>")

    def upper_backings(self):
        """The backings an Image stacks for this upper: tag 0, tag 1."""
        return [self.backing, self.target_backing]

    # ------------------------------------------------------------ writing
    def _check_range(self, offset, length, what):
        if offset % SECTOR or length % SECTOR:
            raise UsageError(f"{what} of {length} bytes at {offset} is not 512-byte aligned")
        if offset + length > self.vsize:
            raise UsageError(f"{what} of {length} bytes at {offset} ends past the warp layer's "
                             f"virtual size {self.vsize}")

    def write(self, data, offset):
        """fs metadata: into fsmeta at the same offset, a tag-0 identity record per 4 MiB."""
        n = len(data)
        self._check_range(offset, n, "write")
        with self.lock:
            pwrite_all(self.data_fd, data, offset)
            recs = []
            for pos in range(0, n, MAX_IO):
                s = (offset + pos) // SECTOR
                recs.append((s, min(MAX_IO, n - pos) // SECTOR, s, TAG_META))
            self._append(recs)
        return n

    def discard(self, offset, length):
        """Punch the range out of fsmeta.  Records are added only where the
        range is mapped now (they then read the punched zeros): a discard
        of unmapped space (mkfs -E discard over the whole disk) adds none,
        so the commit does not copy gigabytes of zeros."""
        self._check_range(offset, length, "discard")
        with self.lock:
            punch_hole(self.data_fd, offset, length)
            recs = []
            for off, ln, _moff, _z, _tag in self.index.lookup(offset // SECTOR, length // SECTOR):
                s, left = off, ln
                while left:
                    n = min(left, MAX_LENGTH)
                    recs.append((s, n, s, TAG_META))
                    s += n
                    left -= n
            self._append(recs)

    def remote_map(self, offset, count, roffset):
        """overlaybd's RemoteData ioctl: [offset, offset+count) of the disk
        reads the target from byte roffset on (tag-1 records, split at 16383 sectors)."""
        self._check_range(offset, count, "remote mapping")
        if roffset < 0 or roffset % SECTOR:
            raise UsageError(f"remote mapping target offset {roffset}: must be a non-negative "
                             f"multiple of {SECTOR}")
        with self.lock:
            recs = []
            s, m, left = offset // SECTOR, roffset // SECTOR, count // SECTOR
            while left:
                n = min(left, MAX_LENGTH)
                recs.append((s, n, m, TAG_REMOTE))
                s += n
                m += n
                left -= n
            self._append(recs)

    def _append(self, recs):
        if not recs:
            return
        buf = b"".join(_record(*r) for r in recs)
        pwrite_all(self.index_fd, buf, self.index_end)
        self.index_end += len(buf)
        for off, ln, moff, tag in recs:
            self.index.insert(off, ln, moff, False, tag)

    def update_vsize(self, vsize):
        raise UsageError(f"{self.index_path}: a warp layer's size is fixed at create ({self.vsize})")

    def fsync(self):
        os.fsync(self.data_fd)
        os.fsync(self.index_fd)

    def records(self):
        return self.index.records()

    def close(self):
        for fd in (self.data_fd, self.index_fd, self._target_fd):
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.index_fd = self._target_fd = -1


def _check_records(body, path, vsize):
    """The records of an index file in file order, (offset, length, moffset,
    tag), each checked: tag 0 (identity, inside vsize) or 1.  Invalid
    (offset 2^50-1) and empty records are skipped, as in an RW replay."""
    end = vsize // SECTOR
    for i, (a, b) in enumerate(_REC.iter_unpack(body)):
        off, length, moff, zeroed, tag = a & ((1 << 50) - 1), a >> 50, b & ((1 << 55) - 1), (b >> 55) & 1, b >> 56
        if off == lsmt.INVALID_OFFSET or length == 0:
            continue
        if tag not in (TAG_META, TAG_REMOTE):
            raise FormatError(path, f"index record {i} tag", tag, "a warp layer has tags 0 and 1 only")
        if off + length > end:
            raise FormatError(path, f"index record {i} offset", off,
                              f"{length} sectors past the virtual size ({end} sectors)")
        if tag == TAG_META and (moff != off or zeroed):
            raise FormatError(path, f"index record {i} moffset", moff,
                              f"a tag-0 record maps fsmeta at its own offset ({off})")
        yield off, length, moff, tag
