"""turboOCI-apply (docs/operations.md, turboOCI-apply): the ext4 metadata of
a layer tar written into a writable warp layer (tcmu_obd.image.warp_rw), with
every regular file's content mapped to its bytes inside the tar instead of
copied; also the tar-header dump of --export / --import, the gzip index
built in the same pass as the tar is read, and overlaybd-create --turboOCI
--mkfs.

How: the image of the config (lowers + the warp upper) is served to the
kernel as overlaybd-apply does (tcmu_obd.build.apply: FUSE + loop, or TCMU
served in this process; never by a running daemon, which refuses warp
uppers), ext4 is mounted, and the tar is walked header by header here (not
with tarfile, because --import reads a header dump without the file data).
Each member goes through tcmu_obd.build.untar's rules (whiteouts, opaque
directories, hard links, symlinks, devices, xattrs, times), except regular
files: they are created and fallocate'd to their size, FIEMAP gives their
blocks, and each extent becomes a remote mapping (tag-1 records) to the
file's content offset in the tar.

fallocate leaves *unwritten* extents, which ext4 reads as zeros, so the
mapped data would never be read.  After unmounting, the image is opened in
this process and the unwritten flag of each extent of those files is cleared
in the on-disk extent entries (i_block or the leaf blocks), written through
the warp upper as metadata.  That needs no metadata checksums (our mkfs
turns metadata_csum off); a file system that has them is refused.

--fstype erofs needs no kernel: the same header walk (tar or --import dump)
feeds format/erofs.ErofsBuilder, whose lower is the merged image below the
warp upper (none for the first layer); its metadata blocks are written into
the warp upper (tag 0) and each new file's data is a remote mapping (tag 1).

Not here: the block device (tcmu_obd.serve), the commit (overlaybd-commit
--turboOCI).
"""
import contextlib
import ctypes
import errno
import fcntl
import io
import logging
import os
import shutil
import stat
import struct
import tarfile
import tempfile
import time
from dataclasses import dataclass

from tcmu_obd.build.untar import Untar
from tcmu_obd.errors import ApplyError, FormatError, LayerTooBig, ObdError, UnsupportedError, UsageError
from tcmu_obd.format.erofs import pax_time_ns

log = logging.getLogger(__name__)

BLOCK = 512
CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_SERVICE_CONFIG = "/etc/overlaybd/overlaybd.json"
DEFAULT_GZ_INDEX = "gzip.meta"
OFFSET_FIELD = slice(329, 345)           # devmajor + devminor: the content offset in a dump
REG_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
EXT4_UNWRITTEN = 32768                   # ee_len above this: an unwritten extent
RO_COMPAT_METADATA_CSUM = 0x400
RO_COMPAT_GDT_CSUM = 0x10

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_DATA_INLINE = 0x200
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXT = struct.Struct("=QQQQQIIII")
FIEMAP_BATCH = 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass
class TurboResult:
    entries: int = 0            # tar members (headers) processed
    files: int = 0              # regular files mapped
    mappings: int = 0           # remote_map calls
    patched: int = 0            # extent entries made "written"
    tar_bytes: int = 0          # bytes of the uncompressed tar (0 with --import)
    compression: str = "none"
    gz_index: str = ""          # the gzip index written, if any
    seconds: float = 0.0
    frontend: str = ""


# -- input -------------------------------------------------------------------------------------------

class _BackingStream(io.RawIOBase):
    """A sequential reader over a core Backing (a ZFile input, decompressed)."""

    def __init__(self, backing):
        self.backing, self.pos = backing, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.backing.size - self.pos)
        if n <= 0:
            return 0
        data = self.backing.pread(self.pos, n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class TurboInput:
    """The uncompressed tar of input_path: a gzip blob (index built on the
    way, at gz_index_path, by format.gzindex.GzipIndexReader, which inflates
    in a worker thread ahead of the header walk), a ZFile (decompressed), or a plain tar/dump.
    `.stream` is read sequentially; `.seekable` when skipping may seek."""

    def __init__(self, path, gz_index_path=None):
        self.path = path
        self.writer = None
        self.compression = "none"
        try:
            self.raw = open(path, "rb", buffering=0)
        except OSError as e:
            raise ApplyError(f"{path}: cannot open: {e.strerror}") from None
        self._fds = []
        head = os.pread(self.raw.fileno(), 4096, 0)
        from tcmu_obd.format import zfile
        if head.startswith(GZIP_MAGIC):
            self.compression = "gzip"
            if gz_index_path:
                from tcmu_obd.format.gzindex import GzipIndexReader, GzipIndexWriter
                self.writer = GzipIndexWriter(gz_index_path, name=path)
                self.stream = GzipIndexReader(self.raw, self.writer)
            else:
                import gzip
                self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
            self.seekable = False
        elif zfile.is_zfile(head[:zfile.HT_SIZE], path):
            self.compression = "zfile"
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds.append(fd)
            backing, _ = zfile.open_backing(fd, 0, os.fstat(fd).st_size, path)
            self.stream = _BackingStream(backing)
            self.seekable = False
        else:
            self.stream = self.raw
            self.seekable = stat.S_ISREG(os.fstat(self.raw.fileno()).st_mode)

    def finish(self):
        """Complete the gzip index (the rest of the blob is read first)."""
        if self.writer is not None:
            info = self.stream.finish(os.fstat(self.raw.fileno()).st_size)
            self.writer = None
            return info
        return None

    def close(self):
        if self.writer is not None:
            self.stream.close()         # the inflate worker stops before its input is closed
            self.writer.abort()
        self.raw.close()
        for fd in self._fds:
            os.close(fd)


# -- tar headers -------------------------------------------------------------------------------------

def _read_full(stream, n):
    out = bytearray()
    while len(out) < n:
        c = stream.read(n - len(out))
        if not c:
            break
        out += c
    return bytes(out)


def _round(n):
    return -(-n // BLOCK) * BLOCK


def _fix_checksum(block):
    b = bytearray(block)
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def _pax_records(data, where):
    out, i = {}, 0
    while i < len(data):
        if data[i] == 0:
            break
        sp = data.find(b" ", i)
        try:
            n = int(data[i:sp])
        except ValueError:
            n = 0
        if sp < 0 or n <= sp - i or i + n > len(data):
            raise ApplyError(f"corrupt tar: bad PAX record at byte {where + i}")
        key, _, value = data[sp + 1:i + n - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        i += n
    return out


class HeaderWalk:
    """Tar members from a stream, header by header: yields (TarInfo, content
    offset in the tar, raw header blocks for a dump).  from_dump: the stream
    is an --export dump (header blocks only: no member's data is skipped;
    content offsets in bytes 329..345; header checksums not checked, as
    overlaybd's TAR_IGNORE_CRC).  A negative size, a uid/gid outside 32
    bits or an mtime/atime outside 64-bit seconds (PAX or base-256) is an
    ApplyError."""

    def __init__(self, stream, from_dump=False, seekable=False):
        self.stream, self.from_dump, self.seekable = stream, from_dump, seekable
        self.pos = 0

    def _read(self, n, what):
        data = _read_full(self.stream, n)
        if len(data) != n:
            raise ApplyError(f"truncated tar: {what} at byte {self.pos} ({len(data)} of {n} bytes)")
        self.pos += n
        return data

    def _skip(self, n):
        if not n:
            return
        if hasattr(self.stream, "skip"):
            done = self.stream.skip(n)
            if done != n:
                raise ApplyError(f"truncated tar: file data ends at byte {self.pos + done}")
            self.pos += n
            return
        if self.seekable:
            size = os.fstat(self.stream.fileno()).st_size
            if self.stream.tell() + n > size:
                raise ApplyError(f"truncated tar: file data ends at byte {size}, "
                                 f"{self.stream.tell() + n - size} bytes short")
            self.stream.seek(n, os.SEEK_CUR)
            self.pos += n
            return
        left = n
        while left:
            c = self.stream.read(min(CHUNK, left))
            if not c:
                raise ApplyError(f"truncated tar: file data ends at byte {self.pos + n - left}")
            left -= len(c)
        self.pos += n

    def __iter__(self):
        longname = longlink = None
        pax, gpax, blocks = {}, {}, []
        while True:
            at = self.pos
            block = _read_full(self.stream, BLOCK)
            self.pos += len(block)
            if not block:
                if at == 0:
                    raise ApplyError("not a tar archive: empty input")
                return          # no end-of-archive blocks: tolerated, as tarfile does
            if len(block) < BLOCK:
                raise ApplyError(f"truncated tar: a partial header block at byte {at}")
            if block == bytes(BLOCK):
                return
            raw = block
            if self.from_dump:
                if block[156:157] in REG_TYPES:       # the offset is not a devmajor/devminor
                    block = block[:OFFSET_FIELD.start] + bytes(16) + block[OFFSET_FIELD.stop:]
                block = _fix_checksum(block)
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise ApplyError(f"corrupt tar: invalid header at byte {at} ({e})") from None
            blocks.append(raw)
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                             tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
                if info.size > 64 << 20:
                    raise ApplyError(f"corrupt tar: extended header of {info.size} bytes at byte {at}")
                data = self._read(_round(info.size), "extended header data")
                blocks.append(data)
                data = data[:info.size]
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    longname = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif info.type == tarfile.GNUTYPE_LONGLINK:
                    longlink = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif info.type == tarfile.XGLTYPE:
                    gpax.update(_pax_records(data, at + BLOCK))
                else:
                    pax.update(_pax_records(data, at + BLOCK))
                continue
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise UnsupportedError(f"{info.name}: GNU sparse tar members are not supported "
                                       f"(header at byte {at})")
            headers = dict(gpax)
            headers.update(pax)
            if longname is not None:
                info.name = longname
            if longlink is not None:
                info.linkname = longlink
            if "path" in headers:
                info.name = headers["path"]
            if "linkpath" in headers:
                info.linkname = headers["linkpath"]
            if info.type == tarfile.DIRTYPE:
                info.name = info.name.rstrip("/")      # as tarfile does for a directory's name
            for key in ("size", "uid", "gid"):
                if key in headers:
                    try:
                        setattr(info, key, int(headers[key]))
                    except ValueError:
                        raise ApplyError(f"{info.name}: PAX {key} = {headers[key]!r} is not a "
                                         f"number (header at byte {at})") from None
            if info.size < 0:
                raise ApplyError(f"{info.name}: size {info.size} is negative (header at byte {at})")
            for key in ("uid", "gid"):
                if not 0 <= getattr(info, key) < 1 << 32:
                    raise ApplyError(f"{info.name}: {key} {getattr(info, key)} is outside 0..4294967295 "
                                     f"(header at byte {at})")
            for key, seconds in (("mtime", info.mtime), ("atime", 0)):
                if not -(1 << 63) <= pax_time_ns(headers.get(key), seconds) // 10**9 < 1 << 63:
                    raise ApplyError(f"{info.name}: {key} {headers.get(key, seconds)} is outside the "
                                     f"64-bit seconds a file system stores (header at byte {at})")
            for key in ("uname", "gname"):
                if key in headers:
                    setattr(info, key, headers[key])
            info.pax_headers = headers
            content = self.pos
            if self.from_dump and info.type in REG_TYPES:
                content = struct.unpack_from("<q", raw, OFFSET_FIELD.start)[0]
                if content < 0 or content % BLOCK:
                    raise ApplyError(f"{info.name}: content offset {content} in the header dump "
                                     f"(bytes 329..336 of the header at byte {at}) is not a "
                                     "non-negative multiple of 512")
            elif info.type in REG_TYPES:
                self._skip(_round(info.size))
            elif info.size and not self.from_dump and info.type not in (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE,
                                                 tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
                self._skip(_round(info.size))
            if info.type in REG_TYPES:
                blocks[-1] = raw[:OFFSET_FIELD.start] + struct.pack("<qq", content, 0) + raw[OFFSET_FIELD.stop:]
            yield info, content, blocks
            longname = longlink = None
            pax, blocks = {}, []


def export_headers(inp, out_path):
    """--export: every header block (long names, PAX included) to out_path,
    regular files with their content offset at bytes 329..336 (LE int64)."""
    n = 0
    walk = HeaderWalk(inp.stream, seekable=inp.seekable)
    with open(out_path, "wb") as out:
        for _info, _content, blocks in walk:
            for b in blocks:
                out.write(b)
            n += 1
        out.write(bytes(2 * BLOCK))
    return n, walk.pos


# -- the ext4 side -----------------------------------------------------------------------------------

def fiemap(fd, size, name):
    """[(logical, physical, length)] of fd's extents (FIEMAP, synced)."""
    out, start = [], 0
    while start < size:
        buf = bytearray(_FIEMAP_HEAD.size + FIEMAP_BATCH * _FIEMAP_EXT.size)
        _FIEMAP_HEAD.pack_into(buf, 0, start, size - start, FIEMAP_FLAG_SYNC, 0, FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if not mapped:
            break
        last = False
        for k in range(mapped):
            lo, ph, ln, _r1, _r2, flags, _a, _b, _c = _FIEMAP_EXT.unpack_from(
                buf, _FIEMAP_HEAD.size + k * _FIEMAP_EXT.size)
            if flags & (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_DATA_INLINE):
                raise ApplyError(f"{name}: FIEMAP extent at file byte {lo} has flags 0x{flags:x}: "
                                 "no fixed disk location to map")
            out.append((lo, ph, ln))
            start = lo + ln
            last = bool(flags & FIEMAP_EXTENT_LAST)
        if last:
            break
    return out


class TurboUntar(Untar):
    """untar's rules, but regular files get no data: fallocate + FIEMAP +
    remote mappings of the upper (a WarpRWLayer) to their tar content."""

    def __init__(self, root, upper, result):
        super().__init__(root)
        self.upper, self.result = upper, result
        self.inodes = set()
        self.content = 0

    def _regular(self, tf, m, path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            size = m.size
            if size <= 0:
                return
            if _libc.fallocate(fd, 0, 0, size) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), path)
            self.inodes.add(os.fstat(fd).st_ino)
            want = _round(size)
            for lo, ph, ln in fiemap(fd, size, m.name):
                count = min(ln, want - lo)
                if count <= 0:
                    break
                self.upper.remote_map(ph, count, self.content + lo)
                self.result.mappings += 1
            self.result.files += 1
        finally:
            os.close(fd)


def walk_into(walk, untar, progress=None):
    for info, content, _blocks in walk:
        untar.content = content
        untar.member(None, info)
        if progress is not None:
            progress(untar.entries)
    untar.finish()


def patch_unwritten(image, inodes, name):
    """Clear the unwritten flag of every extent of `inodes` on the image's
    ext4, writing whole 4 KiB blocks through the (warp) upper.  Returns the
    number of entries patched."""
    from tcmu_obd.format.ext4 import Ext4
    fs = Ext4(image.pread, image.virtual_size, name)
    if fs.feature_ro_compat & RO_COMPAT_METADATA_CSUM:
        raise UnsupportedError(f"{name}: the ext4 has metadata_csum: its extent entries cannot be "
                               "patched without recomputing checksums (make it with --mkfs)")
    bs = fs.block_size
    blocks = {}
    for ino in sorted(inodes):
        inode = fs.inode(ino)
        links = struct.unpack_from("<H", inode.raw, 0x1A)[0]
        if not inode.is_reg or not links:
            continue                    # removed later in the same layer
        for where, _lblk, ln, _pblk in fs.extent_leaf_entries(inode):
            if ln > EXT4_UNWRITTEN:
                blocks.setdefault(where // bs, []).append((where % bs, ln - EXT4_UNWRITTEN))
    n = 0
    for blk, entries in sorted(blocks.items()):
        data = bytearray(image.read(blk * bs, bs))
        for off, ln in entries:
            struct.pack_into("<H", data, off + 4, ln)
            n += 1
        image.write(bytes(data), blk * bs)
    image.fsync()
    return n


# -- devices ---------------------------------------------------------------------------------------

def _frontend(frontend):
    """FUSE when a running TCMU daemon would serve the config (it refuses warp uppers)."""
    from tcmu_obd.serve import blockdev, configfs
    kind = blockdev.choose_frontend(frontend)
    if kind == "tcmu" and configfs.daemon_pids():
        log.info("a TCMU daemon is running and would serve the config; it cannot serve a warp "
                 "upper: using FUSE + loop")
        return "fuse"
    return kind


def mkfs_warp(data_path, index_path, workdir=None, frontend=None):
    """overlaybd-create --turboOCI --mkfs: ext4 (build.apply.MKFS_CMD) on a new warp layer."""
    from tcmu_obd.build.apply import mkfs_layer
    from tcmu_obd.image.warp_rw import WarpRWLayer
    mkfs_layer(data_path, index_path, workdir, _frontend(frontend), open_upper=WarpRWLayer.open)


def load_service_config(path, explicit):
    """overlaybd's tools need the service config to exist; the default path
    missing is only warned about (defaults are used)."""
    from tcmu_obd import service_config
    if not os.path.exists(path):
        if explicit:
            raise UsageError(f"--service_config_path {path}: no such file")
        log.warning("%s does not exist: using the default service settings", path)
        return service_config.load(None)
    return service_config.load(path)


# -- the tool ----------------------------------------------------------------------------------------

def turbo_apply(input_path, config_path=None, *, mkfs_first=False, fstype="ext4", gz_index_path=DEFAULT_GZ_INDEX,
                import_dump=False, export=False, service_cfg=None, workdir=None, frontend=None,
                progress=None):
    """turboOCI-apply; returns a TurboResult."""
    t0 = time.monotonic()
    result = TurboResult()
    if fstype not in ("ext4", "erofs"):
        raise UsageError(f"--fstype {fstype!r}: must be ext4 or erofs")
    if export and import_dump:
        raise UsageError("--export and --import cannot be used together")
    if not config_path:
        raise UsageError("turboOCI-apply needs image_config_path (the config.v1.json, or with "
                         "--export the header dump to write)")
    if fstype == "erofs" and mkfs_first:
        raise UsageError("--mkfs makes ext4: an erofs meta layer needs no mkfs (drop --mkfs)")
    inp = TurboInput(input_path, None if import_dump else gz_index_path)
    try:
        result.compression = inp.compression
        if export:
            result.entries, result.tar_bytes = export_headers(inp, config_path)
        elif fstype == "erofs":
            _apply_erofs(inp, config_path, import_dump, service_cfg, progress, result)
        else:
            _apply(inp, config_path, mkfs_first, import_dump, service_cfg, workdir, frontend, progress,
                   result)
        if not import_dump:
            if inp.finish() is not None:
                result.gz_index = gz_index_path
    except BaseException:
        inp.close()
        raise
    inp.close()
    result.seconds = time.monotonic() - t0
    return result


_EROFS_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
                tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
                tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def erofs_entries(walk, name):
    """format.erofs.TarEntry for each member of a HeaderWalk (tar or dump)."""
    from tcmu_obd.format.erofs import XATTR_PREFIX, TarEntry, pax_time_ns
    it = iter(walk)
    while True:
        try:
            info, content, _blocks = next(it)
        except StopIteration:
            return
        except (ApplyError, UnsupportedError) as e:
            raise type(e)(f"{name}: {e}") from None
        kind = _EROFS_KINDS.get(info.type)
        if kind is None:
            raise UnsupportedError(f"{name}: {info.name}: tar entry type "
                                   f"{info.type.decode('latin-1')!r} in an erofs meta layer")
        pax = info.pax_headers
        xattrs = {k[len(XATTR_PREFIX):]: v.encode("utf-8", "surrogateescape")
                  for k, v in pax.items() if k.startswith(XATTR_PREFIX)}
        reg = kind == "file"
        yield TarEntry(path=info.name, type=kind, mode=info.mode, uid=info.uid, gid=info.gid,
                       mtime=info.mtime, size=info.size if reg else 0, linkname=info.linkname,
                       devmajor=0 if reg else info.devmajor, devminor=0 if reg else info.devminor,
                       xattrs=xattrs, data_offset=content if reg else None,
                       mtime_ns=pax_time_ns(pax.get("mtime"), info.mtime))


def _apply_erofs(inp, config_path, import_dump, service_cfg, progress, result):
    """The erofs meta layer: metadata writes (tag 0) and mappings (tag 1) into the warp upper."""
    from tcmu_obd.format.erofs import ErofsBuilder
    from tcmu_obd.image import assemble, config
    cfg = config.load(config_path, warp_upper=True)
    if not cfg.upper.get("data") or not cfg.upper.get("index"):
        raise ApplyError(f"{cfg.path}: no upper layer (upper.data, upper.index, upper.target)")
    if not cfg.upper.get("target"):
        raise ApplyError(f"{cfg.path}: upper.target is empty: turboOCI-apply needs a warp upper "
                         "(overlaybd-create --turboOCI)")
    image = assemble.open_image(cfg, service_cfg)
    try:
        upper = image.upper
        if len(upper.records()):
            raise ApplyError(f"{cfg.path}: the warp upper {cfg.upper['data']} is not empty: an erofs "
                             "meta layer is written once, into a new warp layer")
        # the upper is empty, so the image reads as the lowers merged
        lower = image.pread if cfg.lowers else None
        b = ErofsBuilder(4096, lower=lower, name=cfg.path)
        walk = HeaderWalk(inp.stream, from_dump=import_dump, seekable=inp.seekable)
        try:
            for entry in erofs_entries(walk, inp.path):
                b.add(entry)
                result.entries += 1
                if progress is not None:
                    progress(result.entries)
        except FormatError as e:
            raise ApplyError(f"{inp.path}: corrupt {inp.compression} stream: {e}") from None
        writes, mappings = b.finish()
        if b.end_block * 4096 > upper.vsize:
            raise LayerTooBig(f"{cfg.path}: the erofs image needs {b.end_block * 4096} bytes "
                              f"({b.end_block} blocks) but the warp layer's virtual size is "
                              f"{upper.vsize}: make the layer with a larger --vsize")
        for off, data in writes:
            upper.write(data, off)
        for off, length, toff in mappings:
            upper.remote_map(off, length, toff)
            result.mappings += 1
        result.files = len(mappings)
        result.tar_bytes = walk.pos
        upper.fsync()
    finally:
        image.close()


def _apply(inp, config_path, mkfs_first, import_dump, service_cfg, workdir, frontend, progress, result):
    from tcmu_obd.build.apply import fs_size, mkfs, mounted
    from tcmu_obd.image import assemble, config
    from tcmu_obd.serve import blockdev
    cfg = config.load(config_path, warp_upper=True)
    if not cfg.upper.get("data") or not cfg.upper.get("index"):
        raise ApplyError(f"{cfg.path}: no upper layer (upper.data, upper.index, upper.target)")
    if not cfg.upper.get("target"):
        raise ApplyError(f"{cfg.path}: upper.target is empty: turboOCI-apply needs a warp upper "
                         "(overlaybd-create --turboOCI)")
    tmp = tempfile.mkdtemp(prefix="obd-turbo-", dir=workdir)
    holder = {}

    def opener():
        holder["image"] = assemble.open_image(cfg, service_cfg)
        return holder["image"]
    try:
        with contextlib.ExitStack() as stack:
            d = stack.enter_context(blockdev.image_device(cfg.path, opener, tmp,
                                                          frontend=_frontend(frontend),
                                                          service_cfg=service_cfg))
            result.frontend = f"{d.frontend} ({d.path}, served by {d.served_by})"
            log.info("applying through %s", result.frontend)
            upper = holder["image"].upper
            if mkfs_first:
                mkfs(d.path)
            try:
                mnt = stack.enter_context(mounted(d.path, os.path.join(tmp, "mnt")))
            except ApplyError as e:
                raise ApplyError(f"{e} (is there an ext4 file system on the image? --mkfs makes one)") \
                    from None
            untar = TurboUntar(mnt, upper, result)
            walk = HeaderWalk(inp.stream, from_dump=import_dump, seekable=inp.seekable)
            try:
                walk_into(walk, untar, progress)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise LayerTooBig(f"the layer does not fit: no space left on the image's ext4 "
                                      f"({fs_size(mnt)} bytes) at byte {walk.pos} of the tar") from None
                where = e.filename[len(mnt):] if isinstance(e.filename, str) and \
                    e.filename.startswith(mnt) else e.filename
                raise ApplyError(f"applying the layer: {where + ': ' if where else ''}"
                                 f"{e.strerror or e}") from None
            except FormatError as e:
                raise ApplyError(f"{inp.path}: corrupt {inp.compression} stream: {e}") from None
            result.entries = untar.entries
            result.tar_bytes = walk.pos
        # unmounted and detached: clear the unwritten flags in-process
        image = assemble.open_image(cfg, service_cfg)
        try:
            result.patched = patch_unwritten(image, untar.inodes, cfg.path)
        finally:
            image.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
