"""overlaybd's per-device config, config.v1.json (spec/runtime.md §a): the
file parsed into an ImageConfig, every key checked.

Parses strictly (a key with the wrong JSON type is an error naming the key;
an upper with only one of data/index, or a TurboOCI key tcmu-obd cannot serve
yet, is refused rather than ignored).  It opens nothing: assembling the image
the config describes, and writing its resultFile, is tcmu_obd.image.assemble.
"""
import json
import os
from dataclasses import dataclass, field

from tcmu_obd.errors import ConfigError, UnsupportedError

_LOWER_KEYS = {"file": str, "dir": str, "digest": str, "size": int, "targetFile": str,
               "targetDigest": str, "gzipIndex": str}
_UPPER_KEYS = {"index": str, "data": str, "target": str, "gzipIndex": str, "vsize": int}
_TOP_KEYS = {"repoBlobUrl": str, "lowers": list, "upper": dict, "resultFile": str, "download": dict,
             "accelerationLayer": bool, "recordTracePath": str}
# TurboOCI keys: accepted by the parser, but a device using them would serve
# the wrong bytes without the target, so a non-empty value is refused.
_TURBOOCI_KEYS = ("targetFile", "targetDigest", "gzipIndex")


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
