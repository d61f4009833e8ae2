"""What the tools share: the output chain (file -> tar -> ZFile), error
reporting with a clean exit status, and the --verbose flag.  No format logic."""
import logging
import os
import sys

from .. import tar, zfile
from ..errors import ObdError, UsageError


def fail(msg, code=1):
    print(f"error: {msg}", file=sys.stderr)
    return code


def run(main_fn, argv):
    """Run a tool body; ObdError and OSError become one line on stderr."""
    try:
        return main_fn(argv) or 0
    except ObdError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return 130


def setup_logging(verbose):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def block_size(kb):
    if kb not in (4, 8, 16, 32, 64):
        raise UsageError(f"--bs {kb}: must be 4, 8, 16, 32 or 64 (KiB)")
    return kb * 1024


def algorithm(name):
    """overlaybd treats an unknown name as LZ4; we refuse it instead."""
    if name not in zfile.ALGOS:
        raise UsageError(f"--algorithm {name!r}: must be lz4 or zstd")
    return zfile.ALGOS[name]


class _TarPayload:
    """Lets a ZFileWriter seek inside the payload of a TarWriter (to
    overwrite its header) by shifting seeks past the tar header."""

    def __init__(self, writer, fileobj):
        self.writer, self.f = writer, fileobj

    def write(self, data):
        return self.writer.write(data)

    def seek(self, pos):
        self.f.seek(tar.HEADER_SIZE + pos)


class Output:
    """An output file with optional tar and ZFile layers; write() then close()."""

    def __init__(self, path, force=False, use_zfile=False, use_tar=False, algo=zfile.ALGO_LZ4,
                 bs=4096, threads=1, overwrite_header=False, mode=0o644):
        if force:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        self.path = path
        self.f = os.fdopen(fd, "w+b", buffering=1 << 20)
        self.tar = tar.TarWriter(self.f) if use_tar else None
        sink = self.tar if use_tar else self.f
        self.zf = None
        if use_zfile:
            target = _TarPayload(self.tar, self.f) if use_tar else self.f
            self.zf = zfile.ZFileWriter(target, algo, bs, True, overwrite_header, threads)
            sink = self.zf
        self.sink = sink
        self.done = False

    def write(self, data):
        return self.sink.write(data)

    def close(self):
        if self.zf is not None:
            self.zf.close()
        if self.tar is not None:
            self.tar.close()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.done = True

    def abort(self):
        """Remove a half-written output."""
        if not self.done:
            self.f.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
