"""overlaybd's per-device config, config.v1.json (docs/runtime.md, Device config file): the
file parsed into an ImageConfig, every key checked.

Parses strictly, with the same mechanism and rules as overlaybd.json
(tcmu_obd.configfile): a key with the wrong JSON type is a ConfigError naming
the file, the key path and the value; an unknown key is warned about and
ignored; an upper with only one of data/index, or a warp upper (target /
gzipIndex, which only the build tools use), is refused rather than ignored.
TurboOCI lowers (targetFile / targetDigest / gzipIndex) are accepted; a
gzipIndex needs a target.  It opens nothing:
assembling the image the config describes, and writing its resultFile, is
tcmu_obd.image.assemble.
"""
import os
from dataclasses import dataclass, field

from tcmu_obd.configfile import Key, ListOf, Table, read, read_json, show
from tcmu_obd.errors import ConfigError, UnsupportedError
from tcmu_obd.service_config import DOWNLOAD_TABLE


def _warp_upper(v):
    """The check of a warp upper's keys: accepted empty only.  A warp upper
    is an RW file the build tools (turboOCI-apply) write through; a device
    serving one would miss the data its remote records point at."""
    return ("warp uppers are used by the build tools only; a device's upper is "
            "a plain RW layer") if v else None


_LOWER = Table({
    "file": Key("str", ""),
    "dir": Key("str", ""),
    "digest": Key("str", ""),
    "size": Key("u64", 0),
    "targetFile": Key("str", ""),           # TurboOCI: the original layer blob, local
    "targetDigest": Key("str", ""),         # ... or remote, repoBlobUrl/<targetDigest>
    "gzipIndex": Key("str", ""),            # ... a .tar.gz read through this gzip index
})


_UPPER = Table({
    "index": Key("str", ""),
    "data": Key("str", ""),
    "target": Key("str", "", _warp_upper, UnsupportedError),
    "gzipIndex": Key("str", "", _warp_upper, UnsupportedError),
    "vsize": Key("i64", 0),                     # written by the snapshotter, unused
})
# the build tools' view: upper.target makes the upper a warp layer (image.warp_rw)
_UPPER_TOOLS = Table({**_UPPER.keys, "target": Key("str", ""), "gzipIndex": Key("str", "")})
_TOP = Table({
    "repoBlobUrl": Key("str", ""),
    "lowers": Key(ListOf(_LOWER), []),
    "upper": Key(_UPPER, {}),
    "resultFile": Key("str", ""),
    "download": Key(DOWNLOAD_TABLE, None),       # None: the global config's (service_config)
    "accelerationLayer": Key("bool", False),
    "recordTracePath": Key("str", ""),
})


@dataclass
class ImageConfig:
    """A parsed config.v1.json.  lowers and upper are dicts of the keys the
    file has (absent keys take the defaults above); raw is the file's JSON."""
    path: str
    lowers: list
    upper: dict
    repo_blob_url: str = ""
    result_file: str = ""
    raw: dict = field(default_factory=dict)
    download: object = None         # a service_config.DownloadConfig when the file has `download`
    unknown_keys: tuple = ()


def load(path, warp_upper=False):
    """Parse a config.v1.json file into an ImageConfig.  warp_upper: allow
    upper.target / upper.gzipIndex (the build tools only)."""
    path = os.fspath(path)
    raw = read_json(path)
    table = Table({**_TOP.keys, "upper": Key(_UPPER_TOOLS, {})}) if warp_upper else _TOP
    top, unknown = read(raw, table, path)
    upper = top.get("upper", {})
    _check_upper(upper, path)
    for i, low in enumerate(top.get("lowers", [])):
        if low.get("gzipIndex") and not (low.get("targetFile") or low.get("targetDigest")):
            raise ConfigError(f"{path}: lowers[{i}].gzipIndex = {show(low['gzipIndex'])}: "
                              "a gzip index needs a target (targetFile or targetDigest)")
    if top.get("accelerationLayer") and top.get("recordTracePath"):
        raise ConfigError(f"{path}: accelerationLayer = true and recordTracePath = "
                          f"{show(top['recordTracePath'])}: cannot both be set")
    return ImageConfig(path, top.get("lowers", []), upper, top.get("repoBlobUrl", ""),
                       top.get("resultFile", ""), raw, top.get("download"), unknown)


def _check_upper(upper, path):
    """overlaybd makes a device writable only when both upper files are set;
    one of them alone is a mistake, not a request for a read-only device."""
    data, index = upper.get("data", ""), upper.get("index", "")
    if bool(data) != bool(index):
        have, missing = ("data", "index") if data else ("index", "data")
        raise ConfigError(f"{path}: upper.{missing} missing (upper.{have} = {show(upper[have])}): "
                          "a writable device needs both upper.data and upper.index")
