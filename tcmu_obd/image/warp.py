"""TurboOCI lowers (docs/formats.md, Warp layers; docs/runtime.md, TurboOCI
lowers): opening a lower's target, the original OCI layer blob, from
`targetFile` (a local file) or `targetDigest` (repoBlobUrl/<digest>, through
the device's registry client, credentials and blob cache), and attaching it
to the warp meta layer, whose tag-1 records read it.

It does not parse the meta layer (tcmu_obd.image.layer and
tcmu_obd.format.lsmt do, with warp=True), stack layers (tcmu_obd.image.stack)
or read data (the core does; a target backing zero-fills past its end).
"""
import os
import stat

from tcmu_obd import core
from tcmu_obd.errors import FormatError, ReadError
from tcmu_obd.format.lsmt import SECTOR

# gzipIndex (a .tar.gz target read through a gzip index) needs the core's
# gzip reader; until this build has it the key is refused, not ignored: the
# records would point into the compressed bytes.
GZIP_SUPPORTED = hasattr(core, "GzipBacking")


def gzip_unsupported(value):
    """The config check of lowers[i].gzipIndex: None, or why it is refused."""
    if not value or GZIP_SUPPORTED:
        return None
    return ("gzip targets are not supported by this build yet; give targetFile = the "
            "uncompressed tar and no gzipIndex")


def has_target(lower):
    """overlaybd's switch: a lower with a target opens as a warp layer (tags
    kept); without one the same file is an ordinary layer (tags forced to 0)."""
    return bool(lower.get("targetFile") or lower.get("targetDigest"))


def open_target(cfg, remote, i, lower):
    """The target of lowers[i] as (backing, closer): targetFile when set,
    else targetDigest from the registry.  The backing zero-fills reads past
    its end (the last sectors of a tar); closer() releases the file."""
    where = f"{cfg.path}: lowers[{i}]"
    path = lower.get("targetFile", "")
    if path:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ReadError(f"{where}.targetFile = {path!r}: cannot open: {e.strerror or e}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ReadError(f"{where}.targetFile = {path!r}: not a regular file")
            backing = core.RawBacking(fd, 0, st.st_size, path)
        except BaseException:
            os.close(fd)
            raise
        closer = lambda: os.close(fd)      # noqa: E731
    else:
        if remote is None:
            raise ReadError(f"{where}.targetDigest = {lower.get('targetDigest')!r}: "
                            "no registry client (remote context) to fetch it with")
        blob, url = remote.open_blob(cfg.repo_blob_url, lower, where, key="targetDigest")
        try:
            backing = core.RawBacking(blob.fd, 0, blob.size, url)
            backing.attach(blob.presence, blob)
        except BaseException:
            blob.close()
            raise
        closer = blob.close
    backing.zero_fill_past_end = True
    return backing, closer


def check_target(layer, target):
    """A tag-1 record whose data would start at or past the target's end is
    a meta layer that does not belong to this target (or a truncated
    target): refused at open, naming the record.  A record that starts
    inside the target and runs past its end is served with zeros there, as
    overlaybd does (the tar's last sectors)."""
    limit = -(-target.size // SECTOR)
    bad = layer.index.check_starts(1, limit)
    if bad >= 0:
        rec = layer.index.record(bad)
        raise FormatError(layer.path, f"index record {bad} moffset", rec[2],
                          f"the tag-1 (target) record for sectors [{rec[0]}, {rec[0] + rec[1]}) starts "
                          f"at byte {rec[2] * SECTOR}, at or past the end of the target {target.name} "
                          f"({target.size} bytes)")
