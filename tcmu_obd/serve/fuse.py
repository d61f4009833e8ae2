"""Serve an Image as one file, MOUNTPOINT/disk, through FUSE, and bind that
file to a loop device: the block path on machines without TCMU.

For: exposing the virtual disk of an Image (size = virtual size) as a
regular file that losetup, mkfs, e2fsck, dd or qemu can open; read-write when
the image has an upper layer, read-only otherwise (opening it for writing
gives EROFS).  Reads are one call into the core per FUSE request, written
straight into libfuse's reply buffer; unaligned reads widen to 512 bytes in a
per-thread scratch buffer; unaligned writes read-modify-write their edge
sectors; fsync syncs the upper layer; fallocate(PUNCH_HOLE or ZERO_RANGE)
discards.  Also: attaching, finding and detaching loop devices bound to the
file, and reading /proc/self/mountinfo (used by `tcmu-obd mount/umount`).

Not for: a directory tree (there is one file, `disk`); resizing, truncating,
chmod, or creating files (refused); page-cache policy beyond the per-open
direct_io/keep_cache flags; the daemon's process life, signals and teardown
order (tcmu_obd.cli.mount); format logic (tcmu_obd.image.stack and the core).

Binding: mfusepy (ctypes over libfuse3, multithreaded loop), the fastest of
the Python bindings when they were compared for this project.  mfusepy
prefers libfuse.so.2 when both are installed, so FUSE_LIBRARY_PATH is pointed
at libfuse3 before it is imported unless the caller set it.  The FUSE class
is subclassed to replace its read/write wrappers, which would otherwise copy
every request through a bytes object.  libfuse installs SIGINT/SIGTERM/SIGHUP
handlers only where the disposition is SIG_DFL, and the FUSE loop runs here
in a background thread: the caller owns those signals and decides the
teardown order (loop device first, then the FUSE mount).  It does not
open the image (the caller passes one) and is not the TCMU path.
"""
import ctypes
import errno
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from ctypes.util import find_library

from tcmu_obd import stats
from tcmu_obd.errors import ObdError, UsageError
from tcmu_obd.format.lsmt import SECTOR

log = logging.getLogger(__name__)

FILE_NAME = "disk"
SUBTYPE = "tcmu-obd"                 # mountinfo fstype: fuse.tcmu-obd
FSNAME_PREFIX = "tcmu-obd:"          # mountinfo source: tcmu-obd:<daemon pid>
MAX_REQUEST = 1 << 20                # the kernel caps FUSE requests at 1 MiB (256 pages)
ATTR_TIMEOUT = 3600.0
MAX_THREADS = 16                     # libfuse worker threads (each request holds the GIL only briefly)                # the file's size and mode never change while mounted

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_PyBUF_READ, _PyBUF_WRITE = 0x100, 0x200
_memview = ctypes.pythonapi.PyMemoryView_FromMemory
_memview.restype = ctypes.py_object
_memview.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]

_binding = None


def binding():
    """The mfusepy module, bound to libfuse3."""
    global _binding
    if _binding is None:
        if not os.environ.get("FUSE_LIBRARY_PATH"):
            lib = find_library("fuse3")
            if lib:
                os.environ["FUSE_LIBRARY_PATH"] = lib
        try:
            import mfusepy
        except ImportError as e:
            raise UsageError(f"FUSE needs the mfusepy package and libfuse3 "
                             f"(pip install mfusepy; apt-get install fuse3 libfuse3-3): {e}") from None
        except OSError as e:        # mfusepy raises it at import when libfuse is missing
            raise UsageError(f"FUSE needs libfuse3 (apt-get install fuse3 libfuse3-3): {e}") from None
        if mfusepy.fuse_version_major != 3:
            raise UsageError(f"mfusepy loaded libfuse {mfusepy.fuse_version_major}."
                             f"{mfusepy.fuse_version_minor}; set FUSE_LIBRARY_PATH to libfuse3.so.3")
        _binding = mfusepy
    return _binding


def _oserror(code):
    return OSError(code, os.strerror(code))


class DiskOps:
    """The FUSE operations of a one-file file system over `image`.  mfusepy
    registers only the methods defined here (the rest answer ENOSYS)."""

    use_ns = True
    flag_nopath = True           # read/write/fsync/... get no path: libfuse skips the lookup
    flag_nullpath_ok = True

    def __init__(self, image, direct_io=False, on_init=None):
        self.image = image
        self.size = image.virtual_size
        self.writable = bool(image.writable)
        self.direct_io = bool(direct_io)
        self.on_init = on_init
        self.now = time.time_ns()
        self.wlock = threading.Lock()       # writes (and their edge reads) in one order
        self.local = threading.local()      # per-thread scratch for unaligned reads
        self.uid, self.gid = os.getuid(), os.getgid()
        self.latency = stats.Hist()         # read latency, for the exporter

    # -- life ---------------------------------------------------------------------------------
    def init_with_config(self, conn, config):
        if conn is not None:
            conn.max_read = MAX_REQUEST     # must match the max_read mount option
        if config is not None:
            config.entry_timeout = ATTR_TIMEOUT
            config.attr_timeout = ATTR_TIMEOUT
            config.negative_timeout = ATTR_TIMEOUT
        if self.on_init is not None:
            self.on_init()

    # -- names --------------------------------------------------------------------------------
    def getattr(self, path, fh=None):
        t = self.now
        common = {"st_uid": self.uid, "st_gid": self.gid, "st_atime": t, "st_mtime": t, "st_ctime": t}
        if path == "/":
            return dict(common, st_mode=stat.S_IFDIR | (0o755 if self.writable else 0o555), st_nlink=2)
        if path == "/" + FILE_NAME or path is None:     # None: fstat of an open file (nullpath_ok)
            return dict(common, st_mode=stat.S_IFREG | (0o644 if self.writable else 0o444), st_nlink=1,
                        st_size=self.size, st_blocks=-(-self.size // 512), st_ino=2)
        raise _oserror(errno.ENOENT)

    def readdir(self, path, fh):
        if path not in ("/", None):       # None: nullpath_ok
            raise _oserror(errno.ENOTDIR)
        return [".", "..", FILE_NAME]

    def statfs(self, path):
        bs = 4096
        return {"f_bsize": bs, "f_frsize": bs, "f_blocks": -(-self.size // bs), "f_bfree": 0,
                "f_bavail": 0, "f_files": 2, "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    def open(self, path, fi):
        if path != "/" + FILE_NAME:
            raise _oserror(errno.EISDIR if path == "/" else errno.ENOENT)
        if fi.flags & os.O_ACCMODE != os.O_RDONLY and not self.writable:
            raise _oserror(errno.EROFS)
        fi.direct_io = self.direct_io
        fi.keep_cache = not self.direct_io    # nothing but us changes the bytes
        return 0

    def truncate(self, path, length, fh=None):
        if not self.writable:
            raise _oserror(errno.EROFS)
        if length != self.size:
            raise _oserror(errno.EPERM)       # a disk does not change size
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        if self.writable:
            self.image.fsync()
        return 0

    # -- data ---------------------------------------------------------------------------------
    # read/write are what mfusepy's stock wrappers call (a bytes copy per request); DiskFUSE
    # replaces those wrappers with read_to/write_from, which work on libfuse's buffer.
    def read(self, path, size, offset, fh):
        return self.image.pread(offset, min(size, max(0, self.size - offset)))

    def write(self, path, data, offset, fh):
        n = self._write_checked(memoryview(data), offset)
        if n < 0:
            raise _oserror(-n)
        return n

    def read_to(self, buf, size, offset):
        """Serve a FUSE read into libfuse's buffer `buf` (a C pointer)."""
        n = min(size, self.size - offset)
        if n <= 0:
            return 0
        t0 = time.monotonic_ns()
        dst = _memview(buf, n, _PyBUF_WRITE)
        try:
            if not (offset | n) & (SECTOR - 1):
                self.image.read_into(dst, offset)      # the hot path: one call into the core
            else:
                lo = offset & ~(SECTOR - 1)
                hi = -(-(offset + n) // SECTOR) * SECTOR
                scratch = self._scratch(hi - lo)
                self.image.read_into(scratch[:hi - lo], lo)
                dst[:] = scratch[offset - lo:offset - lo + n]
            ns = time.monotonic_ns() - t0              # two counter updates per request, not per byte
            stats.pread_done(n, ns, self.latency)
            return n
        except ObdError:
            log.exception("read of %d bytes at %d failed", size, offset)
            return -errno.EIO
        finally:
            dst.release()

    def _scratch(self, n):
        mv = getattr(self.local, "buf", None)
        if mv is None or len(mv) < n:
            mv = memoryview(bytearray(max(n, MAX_REQUEST + 2 * SECTOR)))
            self.local.buf = mv
        return mv

    def write_from(self, buf, size, offset):
        """Serve a FUSE write from libfuse's buffer `buf` (a C pointer)."""
        src = _memview(buf, size, _PyBUF_READ)
        try:
            return self._write_checked(src, offset)
        finally:
            src.release()

    def _write_checked(self, src, offset):
        """Bytes written (short at the end of the disk), or -errno."""
        if not self.writable:
            return -errno.EROFS
        size = len(src)
        if offset >= self.size:
            return -errno.ENOSPC if size else 0
        n = min(size, self.size - offset)
        try:
            with self.wlock:
                self._write(src[:n], offset)
            return n
        except ObdError:
            log.exception("write of %d bytes at %d failed", size, offset)
            return -errno.EIO

    def _write(self, data, offset):
        """Write under wlock; unaligned edges are read, patched and rewritten."""
        n = len(data)
        if not (offset | n) & (SECTOR - 1):
            self.image.write(data, offset)
            return
        lo = offset & ~(SECTOR - 1)
        hi = -(-(offset + n) // SECTOR) * SECTOR
        block = bytearray(hi - lo)
        if offset != lo:
            self.image.read_into(memoryview(block)[:SECTOR], lo)
        if (offset + n) != hi and (hi - SECTOR > lo or offset == lo):
            self.image.read_into(memoryview(block)[hi - lo - SECTOR:], hi - SECTOR)
        block[offset - lo:offset - lo + n] = data
        self.image.write(block, lo)

    def fallocate(self, path, mode, offset, length, fh):
        if not self.writable:
            raise _oserror(errno.EROFS)
        end = min(offset + length, self.size)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            if mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                raise _oserror(errno.EOPNOTSUPP)
            if offset >= end:
                return 0
            a = -(-offset // SECTOR) * SECTOR
            b = end & ~(SECTOR - 1)
            with self.wlock:
                if a < b:
                    self.image.discard(a, b - a)
                    if offset < a:
                        self._write(bytes(a - offset), offset)
                    if b < end:
                        self._write(bytes(end - b), b)
                else:
                    self._write(bytes(end - offset), offset)
            return 0
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise _oserror(errno.EOPNOTSUPP)
        if offset + length > self.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise _oserror(errno.EFBIG)
        return 0                              # every byte of the disk already exists


def _fuse_class():
    mf = binding()

    class DiskFUSE(mf.FUSE):
        """mfusepy's FUSE with zero-copy read and write wrappers."""

        def read(self, path, buf, size, offset, fip):
            return self.operations.read_to(buf, size, offset)

        def write(self, path, buf, size, offset, fip):
            return self.operations.write_from(buf, size, offset)

    return DiskFUSE


class FuseDisk:
    """`image` served as `mountpoint`/disk by a FUSE loop in a background
    thread.  start() returns once the file answers a stat; stop() unmounts
    (fusermount3 -u, or a lazy unmount when the mount is busy) and joins.
    Neither closes the image."""

    def __init__(self, image, mountpoint, direct_io=False, fsname=None, allow_other=False):
        self.image = image
        self.mountpoint = os.path.realpath(mountpoint)
        self.path = os.path.join(self.mountpoint, FILE_NAME)
        self.ops = DiskOps(image, direct_io, on_init=self._on_init)
        self.fsname = fsname or f"{FSNAME_PREFIX}{os.getpid()}"
        self.allow_other = allow_other
        self.inited = threading.Event()
        self.thread = None
        self.error = None
        self.dev = None

    def _on_init(self):
        self.inited.set()

    def _run(self, cls):
        opts = {"fsname": self.fsname, "subtype": SUBTYPE, "max_read": MAX_REQUEST,
                "max_threads": MAX_THREADS, "max_idle_threads": MAX_THREADS}
        if not self.ops.writable:
            opts["ro"] = True
        if self.allow_other:
            opts["allow_other"] = True
        try:
            cls(self.ops, self.mountpoint, raw_fi=True, foreground=True, nothreads=False, **opts)
        except RuntimeError as e:      # fuse_main_real's status: 8 after a signal-ended loop
            self.error = e
            log.debug("FUSE loop ended: %r", e)
        except BaseException as e:    # noqa: BLE001 -- reported by start()/stop()
            self.error = e
            log.error("FUSE loop failed: %s", e)

    def alive(self):
        return self.thread is not None and self.thread.is_alive()

    def start(self, timeout=30.0, cancel=None):
        """Mount and wait until MOUNTPOINT/disk stats as a file of the virtual
        size.  cancel: an Event that aborts the wait (then stop() cleans up)."""
        st = os.stat(self.mountpoint)
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{self.mountpoint}: not a directory")
        parent_dev = st.st_dev
        cls = _fuse_class()
        self.thread = threading.Thread(target=self._run, args=(cls,), name="fuse-loop", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.inited.wait(0.05):
            if not self.thread.is_alive():
                raise UsageError(f"{self.mountpoint}: FUSE mount failed"
                                 + (f" ({self.error})" if self.error else ""))
            if cancel is not None and cancel.is_set():
                return False
            if time.monotonic() > deadline:
                raise UsageError(f"{self.mountpoint}: FUSE mount not ready after {timeout:.0f}s")
        while True:       # init has been answered; the mount is visible once it returns
            st = os.stat(self.mountpoint)
            if st.st_dev != parent_dev:
                break
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UsageError(f"{self.mountpoint}: FUSE mount did not appear")
            time.sleep(0.01)
        self.dev = st.st_dev
        fst = os.stat(self.path)
        if fst.st_size != self.ops.size:
            raise UsageError(f"{self.path}: {fst.st_size} bytes, expected {self.ops.size}")
        return True

    def stop(self, timeout=30.0):
        """Unmount and join the FUSE thread; True if it ended.  A busy mount
        is detached lazily; the thread then ends when its last user closes
        (or when this process exits)."""
        if self.thread is None:
            return True
        if self.thread.is_alive():
            if is_mounted(self.mountpoint, self.fsname):
                ok, msg = unmount(self.mountpoint)
                if not ok:
                    log.warning("%s: %s; detaching it lazily", self.mountpoint, msg)
                    unmount(self.mountpoint, lazy=True)
            self.thread.join(timeout)
        return not self.thread.is_alive()


# -- mount table ---------------------------------------------------------------------------------

def _unescape(field):
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts():
    """[(mount point, fstype, source, 'major:minor')] from /proc/self/mountinfo, in order."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf, rf = left.split(" "), right.split(" ")
            out.append((_unescape(lf[4]), rf[0], _unescape(rf[1]) if len(rf) > 1 else "", lf[2]))
    return out


def mount_at(mountpoint):
    """(fstype, source) of the topmost mount at mountpoint, or None."""
    mp = os.path.abspath(mountpoint)
    found = None
    for point, fstype, source, _dev in mounts():
        if point == mp:
            found = (fstype, source)
    return found


def is_mounted(mountpoint, fsname=None):
    m = mount_at(mountpoint)
    return m is not None and m[0] == "fuse." + SUBTYPE and (fsname is None or m[1] == fsname)


def daemon_pid(source):
    """The pid in a tcmu-obd mount's source (tcmu-obd:<pid>), or None."""
    if source.startswith(FSNAME_PREFIX) and source[len(FSNAME_PREFIX):].isdigit():
        return int(source[len(FSNAME_PREFIX):])
    return None


def _run(cmd):
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr.strip()


def unmount(mountpoint, lazy=False):
    """fusermount3 -u [-z] (umount [-l] without it); (ok, message)."""
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    rc, _, err = _run(cmd)
    if rc and lazy and cmd[0] == "fusermount3":
        rc, _, err = _run(["umount", "-l", mountpoint])
    return rc == 0, err or f"{cmd[0]} exited with {rc}"


# -- loop devices --------------------------------------------------------------------------------

def loop_attach(path, read_only, direct_io=True):
    """losetup -f --show [-r] --direct-io=on PATH -> /dev/loopN."""
    cmd = ["losetup", "-f", "--show"] + (["-r"] if read_only else []) + \
        (["--direct-io=on"] if direct_io else []) + [path]
    rc, out, err = _run(cmd)
    if rc:
        raise UsageError(f"{' '.join(cmd)}: {err or f'exit {rc}'}")
    if err:
        log.warning("losetup: %s", err)
    return out.strip()


def _sys_loop(dev, name):
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/{name}", encoding="utf-8",
                  errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def loop_backing(dev):
    """The backing file of a loop device, or None when it is not bound."""
    return _sys_loop(dev, "backing_file")


def loop_dio(dev):
    return _sys_loop(dev, "dio") == "1"


def loops_for(path):
    """Loop devices bound to path: `losetup -j PATH`; when that cannot stat
    the file (a dead FUSE daemon), the loops whose backing_file is PATH."""
    path = os.path.abspath(path)
    try:
        os.stat(path)
        rc, out, _ = _run(["losetup", "-j", path])
    except OSError:
        rc, out = 1, ""
    if rc == 0:
        return [line.split(":", 1)[0] for line in out.splitlines() if line.startswith("/dev/")]
    devs = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        names = []
    for name in sorted(names):
        if name.startswith("loop") and loop_backing(name) == path:
            devs.append("/dev/" + name)
    return devs


def loop_busy(dev):
    """True when something holds the device exclusively (a mounted file system)."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def loop_detach(dev, path, timeout=10.0):
    """losetup -d; wait until dev no longer reads path.  False if it is still
    bound after timeout (losetup -d on a device in use only sets autoclear:
    the kernel detaches it when the last user closes it)."""
    if loop_backing(dev) != path:
        return True
    rc, _, err = _run(["losetup", "-d", dev])
    if rc and loop_backing(dev) == path:
        log.warning("losetup -d %s: %s", dev, err)
    deadline = time.monotonic() + timeout
    while loop_backing(dev) == path:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
