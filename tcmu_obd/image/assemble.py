"""Assembling the image a config.v1.json describes (docs/runtime.md, Opening the layers):
each lower from its first local candidate or, through a RemoteContext, from
the registry; the RW upper; the stack; then the background download and the
trace prefetch.  Writes the resultFile: `success`, or `failed:<reason>` for
any failure at all, so a poller never waits for a file that never comes.

It does not parse the config file (tcmu_obd.image.config does, strictly) and
holds no registry, cache or format logic (tcmu_obd.remote, tcmu_obd.format).
"""
import errno
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from tcmu_obd import service_config
from tcmu_obd.errors import ConfigError, ObdError, ReadError
from tcmu_obd.image import warp
from tcmu_obd.image.config import ImageConfig, load
from tcmu_obd.image.layer import open_cached_layer, open_layer
from tcmu_obd.image.rw import RWLayer
from tcmu_obd.image.stack import Image
from tcmu_obd.remote import trace
from tcmu_obd.remote.prefetch import start_prefetch

LOCAL_CANDIDATES = ("overlaybd.commit", ".commit", "overlaybd.sealed")

log = logging.getLogger("tcmu_obd.image.assemble")


def local_candidate(lower):
    """The first existing local file for a lower, in overlaybd's order, or None."""
    cands = []
    if lower.get("file"):
        cands.append(lower["file"])
    if lower.get("dir"):
        cands.extend(os.path.join(lower["dir"], name) for name in LOCAL_CANDIDATES)
    return next((c for c in cands if os.path.exists(c)), None)


def open_image(cfg, service_cfg=None, remote=None):
    """Open every layer of a config (in parallel, as overlaybd does with 32
    threads); writes resultFile either way.  Remote lowers need `remote`
    (a remote.RemoteContext) or a `service_cfg` to build one from."""
    if not isinstance(cfg, ImageConfig):
        try:
            cfg = load(cfg)
        except BaseException as e:
            report_unloadable(cfg, e)
            raise
    lowers = list(cfg.lowers)
    if cfg.raw.get("accelerationLayer") and lowers:
        lowers = lowers[:-1]          # the trace layer is not part of the disk
    opened, upper, image, own_remote = [None] * len(lowers), None, None, None
    try:
        if any((local_candidate(low) is None and low.get("digest"))
               or (low.get("targetDigest") and not low.get("targetFile")) for low in lowers) \
                and remote is None:
            # the HTTP stack (requests) is loaded only by images with remote lowers
            from tcmu_obd.remote.context import RemoteContext
            remote = own_remote = RemoteContext(service_cfg or service_config.load(None))
        dl = _download_settings(cfg, service_cfg or getattr(remote, "cfg", None))
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(lowers)))) as pool:
            gz_cfg = None
            if any(low.get("gzipIndex") and low.get("targetDigest") for low in lowers):
                gz_cfg = service_cfg or getattr(remote, "cfg", None) or service_config.load(None)
            futures = [pool.submit(_open_lower, cfg, remote, i, low, gz_cfg) for i, low in enumerate(lowers)]
            errors = []
            for i, fut in enumerate(futures):
                try:
                    opened[i] = fut.result()
                except Exception as e:          # noqa: BLE001 - all are reported, the first raised
                    errors.append(e)
            for e in errors[1:]:
                log.error("%s: also failed: %s", cfg.path, _reason(e))
            if errors:
                raise errors[0]
        if cfg.upper.get("index") and cfg.upper.get("data"):     # both (load refuses one alone)
            upper = _open_upper(cfg)
        image = Image(opened, upper)
        image.remote = remote
        if dl.enable and remote is not None and not _recording_trace(cfg):
            from tcmu_obd.image.download import Downloader     # only devices that download load it
            downloader = Downloader(image, cfg, remote, dl)
            if downloader.items:          # remote lowers with a dir (background download)
                image.downloader = downloader
                downloader.start()
        image.prefetch = start_prefetch(image, cfg, service_cfg or getattr(remote, "cfg", None))
    except BaseException as e:
        # everything opened so far is closed, whatever the failure (a missing
        # file, a corrupt layer, a bug); the resultFile says why
        if image is not None:
            image.close()
        else:
            for layer in opened:
                if layer is not None:
                    layer.close()
            if upper is not None:
                upper.close()
        if own_remote is not None:
            own_remote.close()
        write_result(cfg, f"failed:{_reason(e)}")
        raise
    write_result(cfg, "success")
    return image


def _download_settings(cfg, service_cfg):
    """The device's effective `download` settings (docs/runtime.md, Download settings); a bad object is a ConfigError."""
    if not isinstance(service_cfg, (service_config.ServiceConfig, service_config.DownloadConfig)):
        service_cfg = None
    return service_config.download_settings(cfg.download, service_cfg, cfg.path)


def _recording_trace(cfg):
    """True when recordTracePath asks for a trace recording (no background download then)."""
    path = cfg.raw.get("recordTracePath")
    return bool(path) and trace.detect_mode(path) == trace.MODE_RECORD


def _open_lower(cfg, remote, i, lower, service_cfg=None):
    """lowers[i]: its meta/layer file (local or remote), and for a TurboOCI
    lower its target, attached (tcmu_obd.image.warp)."""
    is_warp = warp.has_target(lower)
    path = local_candidate(lower)
    if path is not None:
        layer = open_layer(path, is_warp)
    elif not lower.get("digest"):
        raise ConfigError(f"{cfg.path}: lowers[{i}]: no local file among "
                          f"{lower.get('file') or '(no file)'} / {lower.get('dir') or '(no dir)'}")
    else:
        blob, url = remote.open_blob(cfg.repo_blob_url, lower, f"{cfg.path}: lowers[{i}]")
        layer = open_cached_layer(blob, url, is_warp)
    if not is_warp:
        return layer
    try:
        target, closer = warp.open_target(cfg, remote, i, lower, service_cfg)
        layer.set_target(target, closer)
        warp.check_target(layer, target)
    except BaseException:
        layer.close()
        raise
    return layer


def _open_upper(cfg):
    """The RW layer; a file that cannot be opened is a ReadError naming the key and the file."""
    data, index = cfg.upper["data"], cfg.upper["index"]
    try:
        if cfg.upper.get("target"):       # a warp upper: only a tool's config.load(warp_upper=True) lets it in
            from tcmu_obd.image.warp_rw import WarpRWLayer
            return WarpRWLayer.open(data, index, cfg.upper["target"], cfg.upper.get("gzipIndex") or None)
        return RWLayer.open(data, index)
    except OSError as e:
        key = "index" if e.filename is not None and os.fspath(e.filename) == index else "data"
        raise ReadError(f"{cfg.path}: upper.{key} = {cfg.upper[key]!r}: cannot open: "
                        f"{e.strerror or e}") from e


def _reason(err):
    """overlaybd's resultFile wording where one exists, and our message.
    Not only our own errors: an OSError names its file, anything else (a bug)
    its type, so the text always says what went wrong."""
    reason = getattr(err, "reason", None)
    url = getattr(err, "url", None)
    if reason and url:
        return f"failed to open remote file {url}: {reason} ({err})"
    if isinstance(err, ObdError):
        return str(err)
    if isinstance(err, OSError):
        where = f"{os.fsdecode(err.filename)}: " if err.filename is not None else ""
        return f"{where}{err.strerror or err} ({errno.errorcode.get(err.errno, err.errno)})"
    return f"unexpected error: {type(err).__name__}: {err}"


def report_unloadable(path, err):
    """Write `failed:<why>` for a config that load() refused."""
    return write_result_of(path, f"failed:{_reason(err)}")


def write_result_of(path, text):
    """Write the resultFile named by the config file at `path`, even when
    load() refuses the config (a bad key elsewhere): the poller must not be
    left waiting.  Nothing is written when the file is not a JSON object
    with a string resultFile."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    result = raw.get("resultFile") if isinstance(raw, dict) else None
    if not isinstance(result, str) or not result:
        return False
    return write_result(ImageConfig(os.fspath(path), [], {}, result_file=result), text)


def write_result(cfg, text):
    """Write (truncating) the config's resultFile, if it has one.  A failure
    is logged with the path and errno; it does not mask the open's own
    outcome, which the caller reports anyway."""
    if not cfg.result_file:
        return False
    try:
        with open(cfg.result_file, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        log.error("cannot write resultFile %s of %s: %s (errno %s %s)", cfg.result_file, cfg.path,
                  e.strerror or e, e.errno, errno.errorcode.get(e.errno, "?"))
        return False
    return True
