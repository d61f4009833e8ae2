"""Writing a layer file: an output file with the optional ZFile and tar
wrappers stacked on it, and an optional second sink (an upload) that gets the
same bytes.  What overlaybd-commit, overlaybd-zfile, overlaybd-merge and the
convertor write through.  Not the LSMT content itself (image.commit) nor the
upload protocol (remote.distribution)."""
import os

from tcmu_obd.format import tar, zfile


class _TarPayload:
    """Lets a ZFileWriter seek inside the payload of a TarWriter (to
    overwrite its header) by shifting seeks past the tar header."""

    def __init__(self, writer, fileobj):
        self.writer, self.f = writer, fileobj

    def write(self, data):
        return self.writer.write(data)

    def seek(self, pos):
        self.f.seek(tar.HEADER_SIZE + pos)


class _Tee:
    """Write-only fan-out: each write goes to `primary`, then to `extra`.  It
    cannot seek, so a ZFile writer on top of it keeps its first header."""

    def __init__(self, primary, extra):
        self.primary, self.extra = primary, extra

    def write(self, data):
        n = self.primary.write(data)
        self.extra.write(data)
        return n


class Output:
    """An output file with optional tar and ZFile layers; write() then close().

    extra: an optional second sink (anything with write(), e.g. an Upload)
    that gets a copy of every byte the ZFile writer (or, without ZFile, the
    caller) writes -- the bytes below any tar wrapper.  With an extra sink
    the ZFile header is not overwritten at close (as overlaybd does when it
    uploads), so the file and the copy are the same bytes.  The extra sink
    is not closed here."""

    def __init__(self, path, force=False, use_zfile=False, use_tar=False, algo=zfile.ALGO_LZ4,
                 bs=4096, threads=1, overwrite_header=False, mode=0o644, extra=None):
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
            if extra is not None:
                target = _Tee(target, extra)
                overwrite_header = False
            self.zf = zfile.ZFileWriter(target, algo, bs, True, overwrite_header, threads)
            sink = self.zf
        elif extra is not None:
            sink = _Tee(sink, extra)
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
