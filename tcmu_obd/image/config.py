"""overlaybd's per-device config, config.v1.json (docs/runtime.md, Device config file), and
opening the image it describes from local files.

Parses strictly (a key with the wrong JSON type is an error naming the key;
an upper with only one of data/index, or a TurboOCI key tcmu-obd cannot serve
yet, is refused rather than ignored), picks each lower's local candidate in
overlaybd's order, and writes the resultFile: `success`, or `failed:<reason>`
for any failure at all, so a poller never waits for a file that never comes.
Fetching remote lowers is tcmu_obd.remote.context's job, not this module's.
"""
import errno
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tcmu_obd.errors import ConfigError, ObdError, ReadError, UnsupportedError
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer

_LOWER_KEYS = {"file": str, "dir": str, "digest": str, "size": int, "targetFile": str,
               "targetDigest": str, "gzipIndex": str}
_UPPER_KEYS = {"index": str, "data": str, "target": str, "gzipIndex": str, "vsize": int}
_TOP_KEYS = {"repoBlobUrl": str, "lowers": list, "upper": dict, "resultFile": str, "download": dict,
             "accelerationLayer": bool, "recordTracePath": str}
LOCAL_CANDIDATES = ("overlaybd.commit", ".commit", "overlaybd.sealed")
# TurboOCI keys: accepted by the parser, but a device using them would serve
# the wrong bytes without the target, so a non-empty value is refused.
_TURBOOCI_KEYS = ("targetFile", "targetDigest", "gzipIndex")

log = logging.getLogger("tcmu_obd.image.config")


@dataclass
class ImageConfig:
    path: str
    lowers: list
    upper: dict
    repo_blob_url: str = ""
    result_file: str = ""
    raw: dict = field(default_factory=dict)


def _typed(obj, spec, where, path):
    out = {}
    for key, typ in spec.items():
        if key not in obj:
            continue
        val = obj[key]
        ok = isinstance(val, typ) and not (typ is int and isinstance(val, bool))
        if not ok:
            raise ConfigError(f"{path}: {where}{key} = {val!r}: expected a JSON {typ.__name__}")
        out[key] = val
    return out


def load(path):
    """Parse a config.v1.json file into an ImageConfig."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    top = _typed(raw, _TOP_KEYS, "", path)
    lowers = []
    for i, lower in enumerate(top.get("lowers", [])):
        if not isinstance(lower, dict):
            raise ConfigError(f"{path}: lowers[{i}] = {lower!r}: expected a JSON object")
        lowers.append(_typed(lower, _LOWER_KEYS, f"lowers[{i}].", path))
    upper = _typed(top.get("upper", {}), _UPPER_KEYS, "upper.", path)
    _check_upper(upper, path)
    for i, lower in enumerate(lowers):
        for key in _TURBOOCI_KEYS:
            if lower.get(key):
                raise UnsupportedError(f"{path}: lowers[{i}].{key} = {lower[key]!r}: "
                                       "TurboOCI layers are not supported yet")
    return ImageConfig(path, lowers, upper, top.get("repoBlobUrl", ""), top.get("resultFile", ""), raw)


def _check_upper(upper, path):
    """overlaybd makes a device writable only when both upper files are set;
    one of them alone is a mistake, not a request for a read-only device."""
    for key in ("target", "gzipIndex"):
        if upper.get(key):
            raise UnsupportedError(f"{path}: upper.{key} = {upper[key]!r}: "
                                   "TurboOCI (warp) uppers are not supported yet")
    data, index = upper.get("data", ""), upper.get("index", "")
    if bool(data) != bool(index):
        have, missing = ("data", "index") if data else ("index", "data")
        raise ConfigError(f"{path}: upper.{missing} missing (upper.{have} = {upper[have]!r}): "
                          "a writable device needs both upper.data and upper.index")


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
    if cfg.raw.get("accelerationLayer") and cfg.raw.get("recordTracePath"):
        err = ConfigError(f"{cfg.path}: accelerationLayer and recordTracePath cannot both be set")
        write_result(cfg, f"failed:{err}")
        raise err
    lowers = list(cfg.lowers)
    if cfg.raw.get("accelerationLayer") and lowers:
        lowers = lowers[:-1]          # the trace layer is not part of the disk
    opened, upper, image, own_remote = [None] * len(lowers), None, None, None
    try:
        if any(local_candidate(low) is None and low.get("digest") for low in lowers) and remote is None:
            from tcmu_obd.remote.context import RemoteContext
            from tcmu_obd import service_config
            remote = own_remote = RemoteContext(service_cfg or service_config.load(None))
        dl = _download_settings(cfg, service_cfg or getattr(remote, "cfg", None))
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(lowers)))) as pool:
            futures = [pool.submit(_open_lower, cfg, remote, i, low) for i, low in enumerate(lowers)]
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
            from tcmu_obd.remote.download import Downloader
            downloader = Downloader(image, cfg, remote, dl)
            if downloader.items:          # remote lowers with a dir (background download)
                image.downloader = downloader
                downloader.start()
        from tcmu_obd.remote.prefetch import start_prefetch
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
    from tcmu_obd import service_config
    if not isinstance(service_cfg, (service_config.ServiceConfig, service_config.DownloadConfig)):
        service_cfg = None
    return service_config.download_settings(cfg.raw.get("download"), service_cfg, cfg.path)


def _recording_trace(cfg):
    """True when recordTracePath asks for a trace recording (no background download then)."""
    from tcmu_obd.remote import trace
    path = cfg.raw.get("recordTracePath")
    return bool(path) and trace.detect_mode(path) == trace.MODE_RECORD


def _open_lower(cfg, remote, i, lower):
    path = local_candidate(lower)
    if path is not None:
        return open_layer(path)
    if not lower.get("digest"):
        raise ConfigError(f"{cfg.path}: lowers[{i}]: no local file among "
                          f"{lower.get('file') or '(no file)'} / {lower.get('dir') or '(no dir)'}")
    return remote.open_layer(cfg.repo_blob_url, lower, f"{cfg.path}: lowers[{i}]")


def _open_upper(cfg):
    """The RW layer; a file that cannot be opened is a ReadError naming the key and the file."""
    data, index = cfg.upper["data"], cfg.upper["index"]
    try:
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
