"""File primitives every room above the core uses: punching a hole (the
space of a range goes back to the file system, its bytes read as zeros), a
pwrite that writes everything, and an atomic whole-file write.  Not
buffering, not fsync policy beyond the atomic write's own."""
import ctypes
import os
import shutil
import tempfile

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_PUNCH = 0x01 | 0x02   # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def punch_hole(fd, offset, length):
    """Deallocate [offset, offset+length) of fd, keeping its size; OSError on failure."""
    if _libc.fallocate(fd, FALLOC_PUNCH, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def pwrite_all(fd, data, offset):
    """Write all of data at offset (a short write is continued)."""
    n = os.pwrite(fd, data, offset)
    if n == len(data):                  # nearly always: one call, no memoryview
        return
    view = memoryview(data)[n:]
    offset += n
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_atomic(path, data, mode=0o600, prefix=".tmp-"):
    """Write data (bytes, or a readable binary file copied in 1 MiB pieces,
    never whole in memory) to path through a synced temporary file in the
    same directory and a rename, so a reader sees the old file or the new one."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(data, "read"):
                shutil.copyfileobj(data, f, 1 << 20)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
