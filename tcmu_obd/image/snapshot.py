"""The live snapshot of a running writable image (docs/runtime.md, Live
snapshot): the current upper is sealed in place and becomes the top lower,
the upper a new config names becomes writable, and that config is renamed
over the device's own, so a restart opens the same stack.

take_snapshot() does the checks, the seal, the rename and the stack change
(Image.restack) while holding the image's lock, so a write acknowledged
before it is in the sealed layer and one after it in the new upper.  Any
failure leaves the image serving its old stack and the old config in place.
It does not serve HTTP or find devices (tcmu_obd.serve.snapshot_api and the
TCMU handler do) and does not create the new upper (the caller does, e.g.
with overlaybd-create).
"""
import logging
import os

from tcmu_obd.errors import ConfigError, ReadError, UsageError
from tcmu_obd.image import config as config_mod
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer
from tcmu_obd.image.stack import MAX_LAYERS

log = logging.getLogger(__name__)


def _same(a, b):
    """True when two paths name one file (same string, or same inode)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def take_snapshot(image, config_path, new_config_path):
    """Snapshot `image` (opened from `config_path`) onto the upper of the
    config at `new_config_path`.  Raises an ObdError saying why when it
    cannot; the image is then unchanged."""
    config_path, new_config_path = os.fspath(config_path), os.fspath(new_config_path)
    if not image.lowers or image.upper is None:
        raise UsageError(f"{config_path}: a snapshot needs lowers and an upper; this image has "
                         f"{len(image.lowers)} lowers and {'an' if image.upper is not None else 'no'} upper")
    if hasattr(image.upper, "upper_backings"):
        raise UsageError(f"{config_path}: a TurboOCI (warp) upper cannot be snapshot")
    new = config_mod.load(new_config_path)
    data, index = new.upper.get("data", ""), new.upper.get("index", "")
    if not data or not index:
        raise ConfigError(f"{new_config_path}: upper: {new.upper!r}: a snapshot needs a new upper "
                          "with both data and index")
    if len(image.file_layer) + 1 > MAX_LAYERS:
        raise UsageError(f"{config_path}: a snapshot would make {len(image.file_layer) + 1} read-only "
                         f"files; at most {MAX_LAYERS}")
    with image.lock:
        old = image.upper
        for key, want, have in (("index", index, old.index_path), ("data", data, old.data_path)):
            if _same(want, have):
                raise ConfigError(f"{new_config_path}: upper.{key} = {want!r}: must differ from "
                                  f"the device's current upper.{key} ({have})")
        if old.sparse:
            raise UsageError(f"{old.data_path}: a sparse upper cannot be sealed in place; "
                             "snapshots need an append-only upper")
        try:
            new_upper = RWLayer.open(data, index)
        except OSError as e:
            key = "index" if e.filename is not None and os.fspath(e.filename) == index else "data"
            raise ReadError(f"{new_config_path}: upper.{key} = {new.upper[key]!r}: cannot open: "
                            f"{e.strerror or e}") from e
        sealed = None
        try:
            if new_upper.sparse:
                raise UsageError(f"{new_config_path}: upper.data = {data!r}: a sparse upper; the "
                                 "snapshot's new upper must be append-only (data and index)")
            if new_upper.vsize not in (0, image.virtual_size):
                raise ConfigError(f"{new_config_path}: upper.data = {data!r}: virtual size "
                                  f"{new_upper.vsize}, but the device has {image.virtual_size} bytes")
            _check_last_lower(new, old.data_path, new_config_path)
            old.fsync()
            old.seal()
            sealed = open_layer(old.data_path)
            if len(sealed.index) != len(old.index):
                raise ReadError(f"{old.data_path}: sealed with {len(sealed.index)} index records, "
                                f"the upper has {len(old.index)}")
            os.replace(new_config_path, config_path)
            image.restack(sealed, new_upper)
        except BaseException:
            if sealed is not None:
                sealed.close()
            new_upper.close()
            # the old upper keeps taking writes: they go where its data ended,
            # over the index and trailer the seal appended
            raise
    _fsync_dir(os.path.dirname(os.path.abspath(config_path)))
    log.info("%s: snapshot: %s sealed as the top lower, %s is the upper; %s renamed over it",
             config_path, old.data_path, data, new_config_path)


def _check_last_lower(new, sealed_path, where):
    """Log when the new config's top lower does not name the sealed file:
    a restart from it would not read what the device serves now.  Not an
    error, as overlaybd does not check it either (the caller may move the
    file afterwards)."""
    top = new.lowers[-1] if new.lowers else {}
    if top.get("file") and _same(top["file"], sealed_path):
        return
    if top.get("dir") and os.path.abspath(top["dir"]) == os.path.dirname(os.path.abspath(sealed_path)):
        return
    log.warning("%s: the top lower (%s) does not name the sealed upper %s: a restart from this "
                "config will not see what the device holds now", where, top or "none", sealed_path)


def _fsync_dir(path):
    """Make the rename durable; a failure is logged (the snapshot is done by then)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("%s: cannot sync the directory after renaming the config: %s", path, e.strerror)
