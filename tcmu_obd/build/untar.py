"""The untar rules of overlaybd-apply, on any directory: what a layer tar
does to a root file system.  Not the block device, mkfs or mount (build.apply),
and nothing here needs a loop device or FUSE, so the rules are tested on a
plain directory.

Untar semantics (overlaybd's libtar.cpp / whiteout.cpp, the same as
containerd's archive.Apply on the points that matter; the member rules are
format/tar_rules.py's, shared with the erofs writer): entries are read in
tarfile's streaming mode, so the input may be a FIFO or stdin; gzip (1F 8B)
and zstd (28 B5 2F FD) inputs are decompressed here, so that `--checksum`
hashes the *uncompressed* tar.  Per entry: the name is normalized (never
above the root; a name that is the root itself must be a directory), missing parent directories are made (0755), symlinks in
parent paths are followed inside the image's root (never out of it).
`.wh..wh..opq` empties its directory and `.wh.<name>` removes <name>
(recursively), both sparing paths unpacked earlier in the same layer; other
`.wh..wh.*` names are ignored.  An existing entry is replaced, except that a
directory over a directory is kept (its attributes updated).  Regular files,
hard links (to a path inside the root), symlinks, character/block devices and
fifos are made; then PAX `SCHILY.xattr.*` (EPERM/ENOTSUP ignored), owner
(lchown), times and mode (not on symlinks).  Directory times are set after the
last entry.  GNU long names and PAX path/linkpath/size come from tarfile.
"""
import errno
import gzip
import hashlib
import io
import logging
import os
import posixpath
import shutil
import stat
import sys
import tarfile
import zlib

from tcmu_obd.errors import ApplyError, UsageError
from tcmu_obd.format import tar_rules
from tcmu_obd.format.tar_rules import XATTR_PREFIX

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COPY_CHUNK = 1 << 20
TAR_BUFSIZE = 1 << 20


# -- input ---------------------------------------------------------------------------------------

class _Counting(io.RawIOBase):
    """Reads from `src`, counting (and optionally hashing) the bytes."""

    def __init__(self, src, hashing=False, prefix=b""):
        self.src = src
        self.count = 0
        self.sha = hashlib.sha256() if hashing else None
        self.prefix = prefix

    def readable(self):
        return True

    def readinto(self, b):
        mv = memoryview(b)
        if self.prefix:
            n = min(len(mv), len(self.prefix))
            mv[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
        else:
            if hasattr(self.src, "readinto"):
                n = self.src.readinto(mv)
            else:
                data = self.src.read(len(mv))
                n = len(data)
                mv[:n] = data
            n = n or 0
        if n:
            self.count += n
            if self.sha is not None:
                self.sha.update(mv[:n])
        return n

    def read(self, size=-1):
        if size is None or size < 0:
            chunks = []
            while True:
                c = self.read(COPY_CHUNK)
                if not c:
                    return b"".join(chunks)
                chunks.append(c)
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def drain(self):
        while self.read(COPY_CHUNK):
            pass


def _read_exact(f, n):
    out = b""
    while len(out) < n:
        c = f.read(n - len(out))
        if not c:
            break
        out += c
    return out


class TarInput:
    """The uncompressed tar stream of an input path ("-" = stdin; a FIFO
    works), with the compression detected from its first bytes.  `.stream`
    is what tarfile reads; `.tar` counts and hashes the uncompressed bytes."""

    def __init__(self, path, fileobj=None):
        self.path = path
        if fileobj is not None:
            self.raw, self._own = fileobj, False
        elif path == "-":
            self.raw, self._own = sys.stdin.buffer, False
        else:
            try:
                self.raw, self._own = open(path, "rb", buffering=0), True
            except OSError as e:
                raise ApplyError(f"{path}: cannot open: {e.strerror}") from None
        head = _read_exact(self.raw, 4)
        self.input = _Counting(self.raw, prefix=head)
        if head.startswith(GZIP_MAGIC):
            self.compression = "gzip"
            dec = gzip.GzipFile(fileobj=io.BufferedReader(self.input, COPY_CHUNK), mode="rb")
        elif head.startswith(ZSTD_MAGIC):
            import zstandard
            self.compression = "zstd"
            dec = zstandard.ZstdDecompressor().stream_reader(self.input, read_size=COPY_CHUNK,
                                                              read_across_frames=True)
        else:
            self.compression = "none"
            dec = self.input
        self.tar = _Counting(dec, hashing=True)
        self.stream = self.tar

    def digest(self):
        return "sha256:" + self.tar.sha.hexdigest()

    def close(self):
        if self._own:
            self.raw.close()


_DECODE_ERRORS = (zlib.error, EOFError, gzip.BadGzipFile)


def decode_errors():
    errs = list(_DECODE_ERRORS)
    try:
        import zstandard
        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


def check_checksum(text):
    """--checksum value -> normalized 'sha256:<hex>' (or '' for none)."""
    if not text:
        return ""
    algo, _, hexpart = text.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart.lower()):
        raise UsageError(f"--checksum {text!r}: expected sha256:<64 hex digits>")
    return "sha256:" + hexpart.lower()


# -- untar ---------------------------------------------------------------------------------------

class _Info(tarfile.TarInfo):
    """Remembers why tarfile stopped reading headers: tarfile ends an archive
    silently at an invalid header after the first one; we call that corrupt."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._obd_stop = e
            raise


class Untar:
    """Unpacks tar members into the directory `root` (the mounted ext4)."""

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.unpacked = set()        # host paths unpacked by this layer
        self.dirs = []               # (host path, atime_ns, mtime_ns) of directory members
        self._resolved = {}          # parent rel path -> host path
        self.entries = 0
        self.is_root = os.geteuid() == 0

    # -- paths ------------------------------------------------------------------------------------
    def resolve_dir(self, rel, create):
        """The host path of directory `rel`, following symlinks inside the
        root; missing directories are made (0755) when `create`."""
        if rel not in self._resolved:
            self._resolved[rel] = walk_in_root(self.root, rel, create=create, need_dir=True)
        return self._resolved[rel]

    def _forget(self):
        """A directory or symlink went away or changed: drop resolved paths."""
        self._resolved.clear()

    # -- removal ------------------------------------------------------------------------------------
    def remove_all(self, path, rmdir=True):
        """overlaybd's remove_all: remove path, recursively, sparing paths
        unpacked earlier in this layer (and directories still holding them)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            if path not in self.unpacked:
                os.unlink(path)
                if stat.S_ISLNK(st.st_mode):
                    self._forget()
            return
        for name in os.listdir(path):
            self.remove_all(os.path.join(path, name))
        if rmdir and path not in self.unpacked:
            try:
                os.rmdir(path)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        self._forget()

    def _remove_tree(self, path):
        """Remove path entirely (an existing directory replaced by a non-directory)."""
        shutil.rmtree(path)
        self._forget()

    # -- members ------------------------------------------------------------------------------------
    def member(self, tf, m):
        self.entries += 1
        action, parent_rel, base = tar_rules.classify(m.name)
        if action == tar_rules.ROOT:
            if not m.isdir():
                raise ApplyError(f"{m.name}: the root can only be a directory, not tar type {m.type!r}")
            path = self.root
        else:
            parent = self.resolve_dir(parent_rel, create=True)
            if action == tar_rules.OPAQUE:
                self.remove_all(parent, rmdir=False)
                return
            if action == tar_rules.META:
                log.debug("%s: whiteout meta file ignored", m.name)
                return
            if action == tar_rules.WHITEOUT:
                self.remove_all(os.path.join(parent, base))
                return
            path = os.path.join(parent, base)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(path)
                if stat.S_ISLNK(st.st_mode):
                    self._forget()
            elif not m.isdir():
                self._remove_tree(path)
        mode = m.mode & 0o7777
        if m.isdir():
            if path != self.root:
                try:
                    os.mkdir(path, 0o700)
                except FileExistsError:
                    pass
        elif m.isreg():
            self._regular(tf, m, path)
        elif m.islnk():
            self._hardlink(m, path)
        elif m.issym():
            os.symlink(m.linkname, path)
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            if kind != stat.S_IFIFO and not self.is_root:
                log.warning("%s: device node skipped (not root)", m.name)
                return
            os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor) if kind != stat.S_IFIFO else 0)
        else:
            raise ApplyError(f"{m.name}: unhandled tar entry type {m.type!r}")
        self._xattrs(m, path)
        self._attrs(m, path, mode)
        self.unpacked.add(path)

    def _regular(self, tf, m, path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            src = tf.extractfile(m)
            left = m.size
            while left > 0:
                chunk = src.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise ApplyError(f"{m.name}: unexpected end of data ({left} bytes missing)")
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                left -= len(chunk)
        finally:
            os.close(fd)

    def _hardlink(self, m, path):
        target = tar_rules.norm(m.linkname)
        tparent_rel, tbase = posixpath.split(target)
        if not tbase:
            raise ApplyError(f"{m.name}: hard link to the root directory")
        try:
            tparent = self.resolve_dir(tparent_rel, create=False)
        except ApplyError as e:
            raise ApplyError(f"{m.name}: hard link target {m.linkname!r}: {e}") from None
        src = os.path.join(tparent, tbase)
        try:
            os.link(src, path, follow_symlinks=False)
        except FileNotFoundError:
            raise ApplyError(f"{m.name}: hard link target {m.linkname!r} does not exist") from None

    def _xattrs(self, m, path):
        for key, value in m.pax_headers.items():
            if not key.startswith(XATTR_PREFIX):
                continue
            name = key[len(XATTR_PREFIX):]
            raw = value.encode("utf-8", "surrogateescape")
            try:
                os.setxattr(path, name, raw, follow_symlinks=False)
            except OSError as e:
                if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    log.warning("%s: xattr %s ignored: %s", m.name, name, e.strerror)
                    continue
                raise

    def _attrs(self, m, path, mode):
        if self.is_root:
            os.chown(path, m.uid, m.gid, follow_symlinks=False)
        mtime_ns = tar_rules.pax_time_ns(m.pax_headers.get("mtime"), m.mtime)
        atime_ns = tar_rules.pax_time_ns(m.pax_headers.get("atime"), None, mtime_ns)
        if m.isdir():
            self.dirs.append((path, atime_ns, mtime_ns))
        else:
            os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)
        if m.issym():
            return
        if m.islnk():
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                return            # a hard link to a symlink: nothing to chmod
        os.chmod(path, mode)

    def finish(self):
        """Directory times, last (creating their children changed them)."""
        for path, atime_ns, mtime_ns in self.dirs:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)


def resolve_in_root(root, rel):
    """The host path of `rel` inside the directory tree `root`, every symlink
    (the last one too) followed as if root were "/"; ApplyError if missing."""
    return walk_in_root(os.path.realpath(root), rel)


def walk_in_root(root, rel, create=False, need_dir=False):
    """Walk `rel` down from the real path `root` as if root were "/"
    (format.tar_rules.walk: symlinks followed inside root, missing components
    made as 0755 directories with create=True); returns the host path."""
    return tar_rules.walk(_HostTree, root, rel, create, need_dir, where=rel)


class _HostTree:
    """format.tar_rules.walk's view of a directory tree: nodes are host paths."""

    @staticmethod
    def lookup(path, name):
        p = os.path.join(path, name)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None, None
        if stat.S_ISLNK(st.st_mode):
            return "link", os.readlink(p)
        return ("dir" if stat.S_ISDIR(st.st_mode) else "other"), p

    @staticmethod
    def mkdir(path, name):
        p = os.path.join(path, name)
        os.mkdir(p, 0o755)
        return p


def untar(stream, root, progress=None):
    """Unpack the tar read from `stream` into `root`; returns the Untar."""
    u = Untar(root)
    try:
        tf = tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BUFSIZE, tarinfo=_Info,
                          errorlevel=2)
    except tarfile.ReadError as e:
        raise ApplyError(f"not a tar archive: {e}") from None
    tf._obd_stop = None
    try:
        while True:
            try:
                m = tf.next()
            except tarfile.ReadError as e:
                raise ApplyError(f"corrupt tar at byte {tf.offset}: {e}") from None
            if m is None:
                break
            tf.members.clear()        # streaming: do not keep every member
            u.member(tf, m)
            if progress is not None:
                progress(u.entries)
    except tarfile.ReadError as e:
        raise ApplyError(f"corrupt tar at byte {tf.offset}: {e}") from None
    stop = tf._obd_stop
    if isinstance(stop, tarfile.TruncatedHeaderError):
        raise ApplyError(f"truncated tar: a partial header block at byte {tf.offset}")
    if stop is not None and not isinstance(stop, (tarfile.EOFHeaderError, tarfile.EmptyHeaderError)):
        raise ApplyError(f"corrupt tar: invalid header at byte {tf.offset} ({stop})")
    u.finish()
    return u
