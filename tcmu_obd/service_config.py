"""The daemon-wide config, /etc/overlaybd/overlaybd.json (docs/runtime.md, Global config file).

Parses every key overlaybd reads, with overlaybd's defaults, into a tree of
frozen dataclasses; resolves the legacy fallbacks (log, cache, credentials)
the way overlaybd does; checks the values overlaybd refuses at start-up; and
merges a device's `download` object with the global one (docs/runtime.md, Download settings).  tcmu-obd's own
knobs live in a separate `tcmuObd` object that overlaybd ignores, so one file
serves both daemons.  This module only parses: it creates no directories,
opens no log files and reads no credentials.

Parsing is tcmu_obd.configfile's, with a table made from the dataclasses
below, the same mechanism and rules as config.v1.json.  Strictness: a key
present with the wrong JSON type (overlaybd asserts there) is a ConfigError
naming the file, the key path and the value.  A path given explicitly
must exist; only "no path given" falls back (load_given).  Integers must
be JSON integers inside the range of the C++ field (uint32/int32/uint64).  An
unknown key is ignored with an UnknownKeyWarning naming its path.  A key given
twice in one object keeps its first value, as RapidJSON's lookup does.

Attribute names are the JSON names in snake_case (`cacheConfig.cacheSizeGB`
is `cfg.cache_config.cache_size_gb`); `key_path(cls, attr)` maps back.
"""
import os
import warnings
from dataclasses import dataclass, field, fields, replace
from urllib.parse import urlsplit

from tcmu_obd import __version__
from tcmu_obd.configfile import Key, Table, read, read_json, refuse
from tcmu_obd.errors import ConfigError, ConfigWarning, UnknownKeyWarning, UnsupportedError  # noqa: F401

DEFAULT_PATH = "/etc/overlaybd/overlaybd.json"
CACHE_TYPES = ("file", "ocf", "download")
CREDENTIAL_MODES = ("file", "http", "https", "uds")
REGISTRY_FS_VERSIONS = ("v1", "v2")
IO_ENGINES = {0: "psync", 1: "libaio", 2: "posix-aio"}
LEGACY_LOG_SIZE_MB = 10          # rotation used with the legacy logLevel/logPath keys
LEGACY_LOG_ROTATE_NUM = 3
DEFAULT_DELAY_EXTRA = 30         # download.delayExtra <= 0 is treated as this
FILE_CACHE_PAGE = 4096


# ConfigWarning and UnknownKeyWarning (tcmu_obd.errors) are importable from
# here too, as before.


# ------------------------------------------------------------------ field kinds
def _p(key, kind, default, check=None):
    """A scalar config field: JSON key, kind from configfile.KINDS, default,
    and an optional check (value -> None, or why it is refused)."""
    return field(default=default, metadata={"key": key, "kind": kind, "check": check})


def _obj(key, cls):
    """A nested-object config field."""
    return field(default_factory=cls, metadata={"key": key, "kind": cls})


# ------------------------------------------------------------------ the tree
@dataclass(frozen=True)
class LogConfig:
    """`logConfig`. Used only when log_path is non-empty (see effective_log)."""
    log_level: int = _p("logLevel", "u32", 1)          # 0 DEBUG, 1 INFO, 2 WARN, 3 ERROR
    log_path: str = _p("logPath", "str", "")
    log_size_mb: int = _p("logSizeMB", "u32", 10)
    log_rotate_num: int = _p("logRotateNum", "i32", 3)


@dataclass(frozen=True)
class CacheConfig:
    """`cacheConfig`. Used only when cache_type is non-empty (see effective_cache),
    except refill_size and block_size, which are always read from here."""
    cache_type: str = _p("cacheType", "str", "")
    cache_dir: str = _p("cacheDir", "str", "/opt/overlaybd/registry_cache")
    cache_size_gb: int = _p("cacheSizeGB", "u32", 4)
    refill_size: int = _p("refillSize", "u32", 262144)
    block_size: int = _p("blockSize", "u32", 65536)     # ocf only


@dataclass(frozen=True)
class GzipCacheConfig:
    """`gzipCacheConfig`: the cache of decompressed TurboOCI gzip targets."""
    enable: bool = _p("enable", "bool", False)
    cache_dir: str = _p("cacheDir", "str", "/opt/overlaybd/gzip_cache")
    cache_size_gb: int = _p("cacheSizeGB", "u32", 4)
    refill_size: int = _p("refillSize", "u32", 1048576)  # code default; the README says 256 KiB


@dataclass(frozen=True)
class CredentialConfig:
    """`credentialConfig`. An empty mode means the legacy credentialFilePath."""
    mode: str = _p("mode", "str", "")                    # file | http | https | uds
    path: str = _p("path", "str", "")                    # file path / URL / socket path
    timeout: int = _p("timeout", "i32", 1)               # seconds, http/https/uds
    client_cert_path: str = _p("client_cert_path", "str", "")
    client_key_path: str = _p("client_key_path", "str", "")
    server_ca_path: str = _p("server_ca_path", "str", "")


@dataclass(frozen=True)
class DownloadConfig:
    """`download` (global default, or a device's own; docs/runtime.md, Download settings)."""
    enable: bool = _p("enable", "bool", False)
    delay: int = _p("delay", "i32", 300)                 # seconds
    delay_extra: int = _p("delayExtra", "i32", 30)       # seconds; <= 0 means 30 (download_settings)
    max_mbps: int = _p("maxMBps", "i32", 100)            # MiB/s; <= 0 means unthrottled
    try_cnt: int = _p("tryCnt", "i32", 5)                # total attempts per layer
    block_size: int = _p("blockSize", "u32", 262144,     # chunk size, bytes
                         lambda v: "must be > 0" if v == 0 else None)


@dataclass(frozen=True)
class P2PConfig:
    """`p2pConfig`."""
    enable: bool = _p("enable", "bool", False)
    address: str = _p("address", "str", "http://localhost:9731/accelerator")


@dataclass(frozen=True)
class ExporterConfig:
    """`exporterConfig`: the Prometheus metrics endpoint."""
    enable: bool = _p("enable", "bool", False)
    uri_prefix: str = _p("uriPrefix", "str", "/metrics")
    port: int = _p("port", "i32", 9863)
    update_interval: int = _p("updateInterval", "u64", 60000000)  # µs; declared, unused


@dataclass(frozen=True)
class PrefetchConfig:
    """`prefetchConfig`."""
    concurrency: int = _p("concurrency", "i32", 16)      # trace replay workers; <= 0: none


@dataclass(frozen=True)
class CertConfig:
    """`certConfig`: TLS client cert/key for registry access (mTLS)."""
    cert_file: str = _p("certFile", "str", "")
    key_file: str = _p("keyFile", "str", "")


@dataclass(frozen=True)
class ServiceApiConfig:
    """`serviceConfig`: the live-snapshot HTTP API."""
    enable: bool = _p("enable", "bool", False)
    address: str = _p("address", "str", "http://127.0.0.1:9862")


@dataclass(frozen=True)
class TcmuObdConfig:
    """`tcmuObd`: tcmu-obd's own settings; overlaybd never reads this object.

    registry_timeout_sec: limit for one registry HTTP request (overlaybd: 30 s).
    registry_retries: extra attempts after a failed registry request.
    read_deadline_sec: how long one device read keeps retrying while the
        registry is unreachable before it fails with EIO; 0 = retry forever,
        as overlaybd does.
    write_cache: what TCMU devices report as their write cache (WCE).  False,
        as overlaybd-tcmu reports: the initiator sends no SYNCHRONIZE CACHE,
        so tcmu-obd makes each write of a writable device durable (fsync of
        the upper's data and index) before acknowledging it.  True: WCE=1,
        writes are acknowledged once written to the upper's files and made
        durable when the initiator flushes.  `tcmu-obd serve --write-cache`
        / `--no-write-cache` override it.
    read_ahead_bytes: largest read-ahead window of a blob read sequentially
        (0: no read-ahead).
    registry_max_requests: range requests in flight per registry, at most.
    fetch_buffer_bytes: bytes fetched but not yet in the cache, at most.
    """
    registry_timeout_sec: float = _p("registryTimeoutSec", "num", 30,
                                     lambda v: "must be > 0" if v <= 0 else None)
    registry_retries: int = _p("registryRetries", "u32", 3)
    read_deadline_sec: float = _p("readDeadlineSec", "num", 60, lambda v: "must be >= 0 (0 = retry forever)"
                                  if v < 0 else None)
    write_cache: bool = _p("writeCache", "bool", False)
    read_ahead_bytes: int = _p("readAheadBytes", "u64", 32 << 20)
    registry_max_requests: int = _p("registryMaxRequests", "u32", 32,
                                    lambda v: "must be >= 1" if v < 1 else None)
    fetch_buffer_bytes: int = _p("fetchBufferBytes", "u64", 64 << 20,
                                 lambda v: "must be >= 1" if v < 1 else None)


def _default_user_agent():
    return f"tcmu-obd/{__version__}"


@dataclass(frozen=True)
class ServiceConfig:
    """The whole overlaybd.json. Use the effective_* properties for the values
    overlaybd actually uses after its legacy fallbacks."""
    log_config: LogConfig = _obj("logConfig", LogConfig)
    log_level: int = _p("logLevel", "u32", 1)                           # legacy
    log_path: str = _p("logPath", "str", "/var/log/overlaybd.log")      # legacy
    cache_config: CacheConfig = _obj("cacheConfig", CacheConfig)
    cache_type: str = _p("cacheType", "str", "file")                    # legacy
    registry_cache_dir: str = _p("registryCacheDir", "str", "/opt/overlaybd/registry_cache")  # legacy
    registry_cache_size_gb: int = _p("registryCacheSizeGB", "u32", 4)  # legacy
    gzip_cache_config: GzipCacheConfig = _obj("gzipCacheConfig", GzipCacheConfig)
    credential_file_path: str = _p("credentialFilePath", "str", "/opt/overlaybd/cred.json")  # legacy
    credential_config: CredentialConfig = _obj("credentialConfig", CredentialConfig)
    io_engine: int = _p("ioEngine", "u32", 0, lambda v: None if v in IO_ENGINES else
                        "must be 0 (psync), 1 (libaio) or 2 (posix-aio)")
    download: DownloadConfig = _obj("download", DownloadConfig)
    enable_audit: bool = _p("enableAudit", "bool", True)
    audit_path: str = _p("auditPath", "str", "/var/log/overlaybd-audit.log")
    enable_thread: bool = _p("enableThread", "bool", False)
    p2p_config: P2PConfig = _obj("p2pConfig", P2PConfig)
    exporter_config: ExporterConfig = _obj("exporterConfig", ExporterConfig)
    registry_fs_version: str = _p("registryFsVersion", "str", "v2")
    prefetch_config: PrefetchConfig = _obj("prefetchConfig", PrefetchConfig)
    cert_config: CertConfig = _obj("certConfig", CertConfig)
    user_agent: str = field(default_factory=_default_user_agent,
                            metadata={"key": "userAgent", "kind": "str"})
    service_config: ServiceApiConfig = _obj("serviceConfig", ServiceApiConfig)
    tcmu_obd: TcmuObdConfig = _obj("tcmuObd", TcmuObdConfig)
    # not config keys: where it came from, and what was ignored
    source: object = field(default=None, compare=False)
    unknown_keys: tuple = field(default=(), compare=False)

    @property
    def effective_log(self):
        """logConfig if its logPath is set, else the legacy logLevel/logPath
        with 10 MiB x 3 rotation."""
        if self.log_config.log_path:
            return self.log_config
        return LogConfig(self.log_level, self.log_path, LEGACY_LOG_SIZE_MB, LEGACY_LOG_ROTATE_NUM)

    @property
    def effective_cache(self):
        """cacheConfig if its cacheType is set, else the legacy cacheType/
        registryCacheDir/registryCacheSizeGB; refillSize and blockSize always
        come from cacheConfig."""
        c = self.cache_config
        if c.cache_type:
            return c
        return replace(c, cache_type=self.cache_type, cache_dir=self.registry_cache_dir,
                       cache_size_gb=self.registry_cache_size_gb)

    @property
    def effective_credential(self):
        """credentialConfig if its mode is set, else mode `file` with the
        legacy credentialFilePath."""
        if self.credential_config.mode:
            return self.credential_config
        return replace(self.credential_config, mode="file", path=self.credential_file_path)

    @property
    def io_engine_name(self):
        return IO_ENGINES[self.io_engine]

    def to_dict(self):
        """The config as a JSON object with overlaybd's key names (every key)."""
        return _to_dict(self)


_CONFIG_CLASSES = (LogConfig, CacheConfig, GzipCacheConfig, CredentialConfig, DownloadConfig,
                   P2PConfig, ExporterConfig, PrefetchConfig, CertConfig, ServiceApiConfig,
                   TcmuObdConfig, ServiceConfig)


def key_path(cls, attr):
    """The JSON key of attribute `attr` of config class `cls`."""
    for f in fields(cls):
        if f.name == attr and "key" in f.metadata:
            return f.metadata["key"]
    raise KeyError(attr)


# ------------------------------------------------------------------ parsing
def _table(cls):
    """The configfile.Table of a config dataclass: its fields' JSON keys,
    kinds, defaults and checks; reading it builds an instance."""
    keys, attrs = {}, {}
    for f in fields(cls):
        if "key" not in f.metadata:
            continue
        kind = f.metadata["kind"]
        default = f.default_factory() if callable(f.default_factory) else f.default
        keys[f.metadata["key"]] = Key(_table(kind) if isinstance(kind, type) else kind, default,
                                      f.metadata.get("check"))
        attrs[f.metadata["key"]] = f.name
    return Table(keys, lambda present: cls(**{attrs[k]: v for k, v in present.items()}))


DOWNLOAD_TABLE = _table(DownloadConfig)      # also a device's `download` (tcmu_obd.image.config)
_SERVICE_TABLE = _table(ServiceConfig)


def _to_dict(obj):
    out = {}
    for f in fields(obj):
        if "key" in f.metadata:
            val = getattr(obj, f.name)
            out[f.metadata["key"]] = _to_dict(val) if isinstance(val, _CONFIG_CLASSES) else val
    return out


def from_dict(d, source="<dict>"):
    """Build a ServiceConfig from a parsed JSON object and check it as overlaybd
    does at start-up. `source` names the file in messages."""
    cfg, unknown = read(d, _SERVICE_TABLE, source)
    cfg = replace(cfg, source=source, unknown_keys=unknown)
    _check(cfg, source)
    return cfg


def load(path=None):
    """Parse the global config at `path`; None gives the built-in defaults.
    A path that cannot be read (missing included) is a ConfigError naming it."""
    if path is None:
        return ServiceConfig()
    path = os.fspath(path)
    return from_dict(read_json(path), source=path)


def load_given(path=None, default_path=None):
    """What the tools and the daemon load: the path the user gave (it must
    exist), or, when none was given, DEFAULT_PATH if it exists, else the
    built-in defaults (as overlaybd starts without its config file)."""
    if path is not None:
        return load(path)
    default_path = DEFAULT_PATH if default_path is None else default_path
    if os.path.exists(default_path):
        return load(default_path)
    return ServiceConfig(source=default_path)


def _check(cfg, source):
    def bad(key, val, why):
        raise refuse(source, key, val, why)

    cache = cfg.effective_cache
    type_key = "cacheConfig.cacheType" if cfg.cache_config.cache_type else "cacheType"
    if cache.cache_type not in CACHE_TYPES:
        bad(type_key, cache.cache_type, "unknown cache type, expected one of " + ", ".join(CACHE_TYPES))
    if cache.cache_type == "file":
        why = _refill_problem(cache.refill_size)
        if why:
            bad("cacheConfig.refillSize", cache.refill_size, why + " for the file cache")
    if cfg.gzip_cache_config.enable:
        why = _refill_problem(cfg.gzip_cache_config.refill_size)
        if why:
            bad("gzipCacheConfig.refillSize", cfg.gzip_cache_config.refill_size,
                why + " for the gzip (full-file) cache")
    if cfg.enable_thread and cache.cache_type == "file":
        bad("enableThread", True, f"cannot be used with cache type file (set by {type_key})")

    cred = cfg.credential_config
    if cred.mode:
        if cred.mode not in CREDENTIAL_MODES:
            bad("credentialConfig.mode", cred.mode,
                "unknown mode, expected one of " + ", ".join(CREDENTIAL_MODES))
        if not cred.path:
            bad("credentialConfig.path", cred.path, f"must not be empty with mode {cred.mode}")

    if cfg.registry_fs_version not in REGISTRY_FS_VERSIONS:
        warnings.warn(f"{source}: registryFsVersion = {cfg.registry_fs_version!r}: not v1 or v2; "
                      "overlaybd treats anything but v2 as v1", ConfigWarning, stacklevel=3)
    if cfg.exporter_config.enable and not 1 <= cfg.exporter_config.port <= 65535:
        bad("exporterConfig.port", cfg.exporter_config.port, "must be a TCP port (1..65535)")
    if cfg.exporter_config.enable and not cfg.exporter_config.uri_prefix.startswith("/"):
        bad("exporterConfig.uriPrefix", cfg.exporter_config.uri_prefix, "must start with '/'")
    if cfg.p2p_config.enable:
        why = _p2p_address_problem(cfg.p2p_config.address)
        if why:
            bad("p2pConfig.address", cfg.p2p_config.address, why)
    if cfg.service_config.enable:
        try:
            service_address(cfg.service_config.address)
        except ValueError as e:
            bad("serviceConfig.address", cfg.service_config.address, str(e))
    if cfg.io_engine != 0:
        warnings.warn(f"{source}: ioEngine = {cfg.io_engine} ({IO_ENGINES[cfg.io_engine]}): "
                      "tcmu-obd reads local layers with pread or a mapping (psync); the same bytes, "
                      "another engine", ConfigWarning, stacklevel=3)


def _p2p_address_problem(address):
    """Why a P2P proxy address cannot be used, or None.  Like overlaybd's
    example "localhost:19145/dadip2p", the scheme may be left out (http)."""
    text = address.strip()
    if not text:
        return "must not be empty with p2pConfig.enable = true"
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError as e:
        return f"not a URL ({e})"
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme!r}: expected http or https"
    if not parts.hostname:
        return "no host"
    if parts.query or parts.fragment:
        return "must not have a query or fragment (blob URLs are appended to it)"
    return None


def service_address(address):
    """(host, port) of serviceConfig.address, `http://host[:port]` (port 80
    when left out, as in any http URL); ValueError saying why it is not one."""
    try:
        parts = urlsplit(address.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a URL ({e})") from None
    if parts.scheme != "http":
        raise ValueError(f"scheme {parts.scheme!r}: expected http://host:port")
    if not parts.hostname:
        raise ValueError("no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("only http://host:port (the API's path is /snapshot)")
    if port == 0:
        raise ValueError("port 0: give the port clients will use")
    return parts.hostname, 80 if port is None else port


def _refill_problem(size):
    if size < FILE_CACHE_PAGE or size & (size - 1):
        return f"must be a power of two and a multiple of {FILE_CACHE_PAGE}"
    return None


# ------------------------------------------------------------------ download merging
def download_settings(image_download, service_cfg, source="config.v1.json"):
    """The background-download settings of one device (docs/runtime.md, Download settings).

    image_download: the device config's `download` value (a JSON object, or
    the DownloadConfig tcmu_obd.image.config parsed it into), or None when the key
    is absent, in which case the global object is used (overlaybd copies the
    global JSON object in; parsing it per key with the same defaults gives the
    same result).  A present object is parsed per key; its missing keys take
    the built-in defaults, not the global values.
    service_cfg: a ServiceConfig, a DownloadConfig (e.g. from reload_download),
    or None for built-in defaults.
    The result has delay_extra <= 0 replaced by 30.
    """
    if image_download is None:
        if isinstance(service_cfg, ServiceConfig):
            dl = service_cfg.download
        elif isinstance(service_cfg, DownloadConfig):
            dl = service_cfg
        elif service_cfg is None:
            dl = DownloadConfig()
        else:
            raise TypeError(f"service_cfg: expected ServiceConfig/DownloadConfig/None, "
                            f"got {type(service_cfg).__name__}")
    elif isinstance(image_download, DownloadConfig):
        dl = image_download
    else:
        dl, _ = read(image_download, DOWNLOAD_TABLE, source, "download.")
    if dl.delay_extra <= 0:
        dl = replace(dl, delay_extra=DEFAULT_DELAY_EXTRA)
    return dl


def reload_download(path):
    """Re-read only the `download` object of the global config, as overlaybd
    does for every new device.  A missing or unparsable file gives the
    built-in defaults (overlaybd logs and ignores it); a `download` object
    with a wrong type is a ConfigError."""
    if path is None or not os.path.exists(path):
        return DownloadConfig()
    try:
        raw = read_json(path)
    except ConfigError as e:
        warnings.warn(f"{e}; using built-in download defaults", ConfigWarning, stacklevel=2)
        return DownloadConfig()
    if not isinstance(raw, dict) or "download" not in raw:
        return DownloadConfig()
    dl, _ = read(raw["download"], DOWNLOAD_TABLE, path, "download.")
    return dl
