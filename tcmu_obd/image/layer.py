"""Opening one read-only layer file: detect the wrappers (tar, then ZFile,
then LSMT, as overlaybd does) and load the LSMT index.

A Layer owns its file descriptor and hands the core a backing (raw bytes or
a ZFile's decompressed view) plus its Index.  This module does not merge
layers (tcmu_obd.image.stack) nor fetch remote blobs.
"""
import logging
import os
from dataclasses import dataclass, field

from tcmu_obd import core
from tcmu_obd.format import lsmt, tar, zfile
from tcmu_obd.errors import FormatError, ReadError

log = logging.getLogger(__name__)

HEAD_PREFETCH = 4096 * 3       # tar, ZFile and LSMT headers
TAIL_PREFETCH = 1 << 20        # LSMT/ZFile trailers, the jump table, most indexes (at most 1/8 of a blob)
# ZFile layers (local files and cache files of remote blobs) are read through a read-only
# mapping (bench_zfile: a pread per block costs ~0.4 us, a quarter of a 4 KiB decode);
# TCMU_OBD_MMAP=0 turns it off.
MMAP_ZFILE = os.environ.get("TCMU_OBD_MMAP", "1") != "0"


@dataclass
class Layer:
    path: str
    fd: int
    backing: object
    header: lsmt.LsmtHeader
    trailer: lsmt.LsmtHeader
    index: object
    wrappers: list = field(default_factory=list)
    zinfo: object = None
    tar_extent: tuple = None
    owner: object = None          # a cache.CachedBlob the layer reads through, closed with it
    target: object = None         # a warp (TurboOCI) layer's target backing: tag-1 records read it
    target_closer: object = None  # releases the target's file or cached blob

    @property
    def virtual_size(self):
        return self.trailer.virtual_size

    @property
    def backings(self):
        """The layer's files in record-tag order: itself, then its target if warp."""
        return [self.backing] if self.target is None else [self.backing, self.target]

    def set_target(self, backing, closer):
        """Make this (warp-loaded) layer read its tag-1 records from `backing`;
        `closer` is called on close."""
        self.target, self.target_closer = backing, closer

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.owner is not None:
            self.owner.close()
            self.owner = None
        if self.target_closer is not None:
            self.target_closer()
            self.target_closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def unwrap(fd, path, size=None, read_at=None):
    """Detect tar and ZFile around an open file: (backing, wrappers, zinfo, tar extent).
    `read_at(off, n)` reads the file (default: pread of fd); a cached remote
    blob passes its own, which fetches what is missing first."""
    if size is None:
        size = os.fstat(fd).st_size
    base, wrappers, extent = 0, [], None
    if read_at is None:
        def read_at(off, n):
            return os.pread(fd, n, off)

    found = tar.detect(read_at, size, path)
    if found is not None:
        base, size = found
        extent = found
        wrappers.append("tar")
    head = read_at(base, zfile.HT_SIZE)
    if len(head) < zfile.HT_SIZE and zfile.is_zfile_magic(head):
        raise FormatError(path, "file size", size,
                          f"truncated: ZFile magic, but a ZFile header needs {zfile.HT_SIZE} bytes")
    if zfile.is_zfile(head, path):
        backing, zinfo = zfile.open_backing(fd, base, size, path, read_at)
        wrappers.append("zfile")
        return backing, wrappers, zinfo, extent
    if len(head) == zfile.HT_SIZE and head[:8] == zfile.MAGIC0 and head[8:24] == zfile.MAGIC1:
        # overlaybd would take it for a raw LSMT file and fail on the LSMT
        # magic; say what is really wrong instead.
        flags = zfile.ZHeader.unpack(head, path, "header").flags
        raise FormatError(path, "zfile header flags", flags, "ZFile magic, but the HEADER bit (0x1) is clear")
    return core.RawBacking(fd, base, size, str(path)), wrappers, None, extent


def open_layer(path, warp=False):
    """Open a committed (or sealed) layer file, tar- and ZFile-wrapped or not.
    warp: keep the index's tags (a TurboOCI meta layer opened with its target)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise FormatError(path, "file", path, f"cannot open: {e.strerror}") from None
    try:
        backing, wrappers, zinfo, extent = unwrap(fd, path)
        if zinfo is not None and MMAP_ZFILE:
            # a committed local file is immutable: decode blocks straight from a
            # mapping (no pread per read); a SIGBUS falls back to pread
            backing.map_blocks()
        header, trailer, index = lsmt.load_ro(backing, path, warp)
    except OSError as e:            # e.g. EISDIR, EIO: name the file, not just the errno
        os.close(fd)
        raise ReadError(f"{path}: cannot read: {e.strerror or e}") from e
    except BaseException:
        os.close(fd)
        raise
    return Layer(path, fd, backing, header, trailer, index, wrappers, zinfo, extent)


def open_cached_layer(blob, name, warp=False):
    """Open a layer whose bytes come from a cache.CachedBlob (a remote blob):
    only the headers, trailer and index are fetched now; the backing fetches
    the rest on demand and refetches blocks that fail their CRC.  Headers or
    an index that fail their checks when some of the blob came from the
    cache are evicted and fetched again, once: bytes damaged on the cache
    disk heal, a blob bad at the registry still fails (with its error)."""
    try:
        cached_before = blob.presence.count(0, blob.size) > 0
        try:
            return _open_cached(blob, name, warp)
        except FormatError as e:
            if not cached_before:
                raise
            log.warning("%s: %s; evicting its cached copy and fetching it again", name, e)
            blob.evict(0, blob.size)
        return _open_cached(blob, name, warp)
    except BaseException:
        blob.close()
        raise


def _open_cached(blob, name, warp):
    # headers sit at the front, trailers, jump table and index at the back:
    # fetch both ends at once, one round trip instead of three to five
    tail = min(blob.size, TAIL_PREFETCH, max(blob.unit, blob.size // 8))
    core.fetch_all([(blob, 0, min(blob.size, HEAD_PREFETCH)), (blob, blob.size - tail, tail)])
    backing, wrappers, zinfo, extent = unwrap(blob.fd, name, blob.size, blob.read_at)
    backing.attach(blob.presence, blob)
    if zinfo is not None and MMAP_ZFILE:
        backing.map_blocks()        # the cache file has the blob's size: holes read as zeros
    header, trailer, index = lsmt.load_ro(backing, name, warp)
    return Layer(name, -1, backing, header, trailer, index, wrappers, zinfo, extent, owner=blob)
