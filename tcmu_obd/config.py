"""overlaybd's per-device config, config.v1.json (spec/runtime.md §a), and
opening the image it describes from local files.

Parses strictly (a key with the wrong JSON type is an error naming the key),
picks each lower's local candidate in overlaybd's order, and writes the
resultFile.  Remote lowers (registry blobs) are not handled here yet.
"""
import json
import os
from dataclasses import dataclass, field

from .errors import ConfigError, ObdError, UnsupportedError
from .image import Image
from .layer import open_layer
from .rw import RWLayer

_LOWER_KEYS = {"file": str, "dir": str, "digest": str, "size": int, "targetFile": str,
               "targetDigest": str, "gzipIndex": str}
_UPPER_KEYS = {"index": str, "data": str, "target": str, "gzipIndex": str, "vsize": int}
_TOP_KEYS = {"repoBlobUrl": str, "lowers": list, "upper": dict, "resultFile": str, "download": dict,
             "accelerationLayer": bool, "recordTracePath": str}
LOCAL_CANDIDATES = ("overlaybd.commit", ".commit", "overlaybd.sealed")


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
    return ImageConfig(path, lowers, upper, top.get("repoBlobUrl", ""), top.get("resultFile", ""), raw)


def local_candidate(lower):
    """The first existing local file for a lower, in overlaybd's order, or None."""
    cands = []
    if lower.get("file"):
        cands.append(lower["file"])
    if lower.get("dir"):
        cands.extend(os.path.join(lower["dir"], name) for name in LOCAL_CANDIDATES)
    return next((c for c in cands if os.path.exists(c)), None)


def open_image(cfg):
    """Open every layer of a config; writes resultFile either way."""
    if not isinstance(cfg, ImageConfig):
        cfg = load(cfg)
    opened, upper = [], None
    try:
        for i, lower in enumerate(cfg.lowers):
            path = local_candidate(lower)
            if path is None:
                if lower.get("digest"):
                    raise UnsupportedError(f"{cfg.path}: lowers[{i}] has no local file and remote "
                                           f"layers ({lower['digest']}) are not yet supported")
                raise ConfigError(f"{cfg.path}: lowers[{i}]: no local file among "
                                  f"{lower.get('file') or '(no file)'} / {lower.get('dir') or '(no dir)'}")
            opened.append(open_layer(path))
        if cfg.upper.get("index") and cfg.upper.get("data"):     # both, as overlaybd requires
            upper = RWLayer.open(cfg.upper["data"], cfg.upper["index"])
        image = Image(opened, upper)
    except ObdError as e:
        for layer in opened:
            layer.close()
        if upper is not None:
            upper.close()
        write_result(cfg, f"failed:{e}")
        raise
    write_result(cfg, "success")
    return image


def write_result(cfg, text):
    if cfg.result_file:
        try:
            with open(cfg.result_file, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            pass
