"""TurboOCI lowers (docs/formats.md, Warp layers; docs/runtime.md, TurboOCI
lowers): opening a lower's target, the original OCI layer blob, from
`targetFile` (a local file) or `targetDigest` (repoBlobUrl/<digest>, through
the device's registry client, credentials and blob cache); a .tar.gz target
read through its `gzipIndex` (the core's GzipBacking), optionally through the
gzip cache (gzipCacheConfig: the decompressed stream kept in a sparse file
per targetDigest, the blob cache's machinery with the GzipBacking as its
source); and attaching the target to the warp meta layer, whose tag-1
records read it.

It does not parse the meta layer (tcmu_obd.image.layer and
tcmu_obd.format.lsmt do, with warp=True), the gzip index
(tcmu_obd.format.gzindex), stack layers (tcmu_obd.image.stack) or read data
(the core does; a target backing zero-fills past its end).
"""
import os
import stat
import threading

from tcmu_obd import core
from tcmu_obd.errors import FormatError, ReadError
from tcmu_obd.format import gzindex
from tcmu_obd.format.lsmt import SECTOR
from tcmu_obd.remote.cache import FileCache

def has_target(lower):
    """overlaybd's switch: a lower with a target opens as a warp layer (tags
    kept); without one the same file is an ordinary layer (tags forced to 0)."""
    return bool(lower.get("targetFile") or lower.get("targetDigest"))


def open_target(cfg, remote, i, lower, service_cfg=None):
    """The target of lowers[i] as (backing, closer): targetFile when set,
    else targetDigest from the registry; with gzipIndex, its decompressed
    view (through the gzip cache when service_cfg's gzipCacheConfig enables
    it and the lower has a targetDigest).  The backing zero-fills reads
    past its end (the last sectors of a tar); closer() releases it all."""
    where = f"{cfg.path}: lowers[{i}]"
    backing, closer = _open_blob(cfg, remote, where, lower)
    if lower.get("gzipIndex"):
        try:
            backing, closer = _gzip_view(where, lower, backing, closer, service_cfg)
        except BaseException:
            closer()
            raise
    backing.zero_fill_past_end = True
    return backing, closer


def _open_blob(cfg, remote, where, lower):
    """The target blob's own bytes: (backing, closer)."""
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
    return backing, closer


def _gzip_view(where, lower, blob, blob_closer, service_cfg):
    """The decompressed stream of a gzip target: (backing, closer)."""
    path = lower["gzipIndex"]
    try:
        gz = gzindex.open_backing(blob, path, f"{blob.name} (gzip, index {path})")
    except OSError as e:
        raise ReadError(f"{where}.gzipIndex = {path!r}: cannot read: {e.strerror or e}") from e
    gcfg = getattr(service_cfg, "gzip_cache_config", None)
    if gcfg is None or not gcfg.enable or not lower.get("targetDigest"):
        return gz, blob_closer
    cache = gzip_cache(gcfg)
    cached = cache.open(lower["targetDigest"], gz.size, _GzipSource(gz))
    try:
        view = core.RawBacking(cached.fd, 0, cached.size, f"{cached.path} (gzip cache of {blob.name})")
        view.attach(cached.presence, cached)
    except BaseException:
        cached.close()
        raise

    def closer():
        try:
            cached.close()
        finally:
            blob_closer()
    return view, closer


class _GzipSource:
    """The gzip cache's fill source: one GzipBacking read per refill (its
    own misses in the compressed blob are fetched by the GzipBacking)."""

    def __init__(self, gz):
        self.gz = gz

    def read(self, offset, length):
        return self.gz.pread(offset, length)


_GZIP_CACHES = {}
_GZIP_LOCK = threading.Lock()


def gzip_cache(gcfg):
    """The process's gzip cache for gcfg.cache_dir (one FileCache per
    directory, shared by every device, as the blob cache is)."""
    key = os.path.realpath(gcfg.cache_dir)
    with _GZIP_LOCK:
        cache = _GZIP_CACHES.get(key)
        if cache is None:
            cache = _GZIP_CACHES[key] = FileCache(gcfg.cache_dir, gcfg.cache_size_gb, gcfg.refill_size)
        return cache


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
