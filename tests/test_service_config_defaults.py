"""Tests of tcmu_obd.service_config against docs/runtime.md (Global config
keys, and the download defaults): every key's default, the legacy fallbacks, unknown
keys, strict typing, the start-up checks overlaybd makes, and merging a
device's download object with the global one."""
import contextlib
import json
import warnings

import pytest

from tcmu_obd import service_config as sc
from tcmu_obd.errors import ConfigError

# Key path -> default, transcribed from overlaybd's defaults (docs/runtime.md, Global config keys).
SPEC_DEFAULTS = {
    "logConfig.logLevel": 1,
    "logConfig.logPath": "",
    "logConfig.logSizeMB": 10,
    "logConfig.logRotateNum": 3,
    "logLevel": 1,
    "logPath": "/var/log/overlaybd.log",
    "cacheConfig.cacheType": "",
    "cacheConfig.cacheDir": "/opt/overlaybd/registry_cache",
    "cacheConfig.cacheSizeGB": 4,
    "cacheConfig.refillSize": 262144,
    "cacheConfig.blockSize": 65536,
    "cacheType": "file",
    "registryCacheDir": "/opt/overlaybd/registry_cache",
    "registryCacheSizeGB": 4,
    "gzipCacheConfig.enable": False,
    "gzipCacheConfig.cacheDir": "/opt/overlaybd/gzip_cache",
    "gzipCacheConfig.cacheSizeGB": 4,
    "gzipCacheConfig.refillSize": 1048576,
    "credentialFilePath": "/opt/overlaybd/cred.json",
    "credentialConfig.mode": "",
    "credentialConfig.path": "",
    "credentialConfig.timeout": 1,
    "credentialConfig.client_cert_path": "",
    "credentialConfig.client_key_path": "",
    "credentialConfig.server_ca_path": "",
    "ioEngine": 0,
    "download.enable": False,
    "download.delay": 300,
    "download.delayExtra": 30,
    "download.maxMBps": 100,
    "download.tryCnt": 5,
    "download.blockSize": 262144,
    "enableAudit": True,
    "auditPath": "/var/log/overlaybd-audit.log",
    "enableThread": False,
    "p2pConfig.enable": False,
    "p2pConfig.address": "http://localhost:9731/accelerator",
    "exporterConfig.enable": False,
    "exporterConfig.uriPrefix": "/metrics",
    "exporterConfig.port": 9863,
    "exporterConfig.updateInterval": 60000000,
    "registryFsVersion": "v2",
    "prefetchConfig.concurrency": 16,
    "certConfig.certFile": "",
    "certConfig.keyFile": "",
    "serviceConfig.enable": False,
    "serviceConfig.address": "http://127.0.0.1:9862",
    # tcmu-obd's own object
    "tcmuObd.registryTimeoutSec": 30,
    "tcmuObd.registryRetries": 3,
    "tcmuObd.readDeadlineSec": 60,
    "tcmuObd.writeCache": False,
    "tcmuObd.readAheadBytes": 32 << 20,
    "tcmuObd.registryMaxRequests": 32,
    "tcmuObd.fetchBufferBytes": 64 << 20,
}


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def write(tmp_path, obj, name="overlaybd.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------ defaults
@pytest.mark.parametrize("make", [lambda tmp: sc.load(None),
                                  lambda tmp: sc.load_given(None, tmp / "absent.json"),
                                  lambda tmp: sc.from_dict({}, "x"),
                                  lambda tmp: sc.load(write(tmp, {}))],
                         ids=["None", "absent file", "from_dict {}", "empty object"])
def test_service_config_defaults_every_key(tmp_path, make):
    cfg = make(tmp_path)
    flat = flatten(cfg.to_dict())
    ua = flat.pop("userAgent")
    assert ua.startswith("tcmu-obd/")
    assert flat == SPEC_DEFAULTS                   # same keys, same values, nothing extra
    assert cfg.unknown_keys == ()


def test_service_config_defaults_attribute_access():
    cfg = sc.load()
    assert sc.DEFAULT_PATH == "/etc/overlaybd/overlaybd.json"
    assert cfg.cache_config.refill_size == 262144
    assert cfg.gzip_cache_config.refill_size == 1 << 20
    assert cfg.exporter_config.update_interval == 60_000_000
    assert cfg.tcmu_obd.read_deadline_sec == 60
    assert cfg.io_engine_name == "psync"
    assert sc.key_path(sc.CacheConfig, "cache_size_gb") == "cacheSizeGB"
    with pytest.raises(Exception):
        cfg.io_engine = 1                           # frozen


def test_service_config_defaults_roundtrip_and_overlaybd_example(tmp_path):
    example = {   # overlaybd's shipped example, plus our own object
        "logConfig": {"logLevel": 1, "logPath": "/var/log/overlaybd.log"},
        "cacheConfig": {"cacheType": "file", "cacheDir": "/opt/overlaybd/registry_cache",
                        "cacheSizeGB": 4},
        "gzipCacheConfig": {"enable": True, "cacheDir": "/opt/overlaybd/gzip_cache", "cacheSizeGB": 4},
        "credentialConfig": {"mode": "file", "path": "/opt/overlaybd/cred.json"},
        "ioEngine": 0,
        "download": {"enable": False, "delay": 600, "delayExtra": 30, "maxMBps": 100},
        "p2pConfig": {"enable": False, "address": "localhost:19145/dadip2p"},
        "exporterConfig": {"enable": False, "uriPrefix": "/metrics", "port": 9863},
        "enableAudit": True,
        "auditPath": "/var/log/overlaybd-audit.log",
        "registryFsVersion": "v2",
        "tcmuObd": {"registryTimeoutSec": 2.5, "registryRetries": 0, "readDeadlineSec": 0},
    }
    with no_warnings():             # overlaybd's own example has nothing tcmu-obd ignores
        cfg = sc.load(write(tmp_path, example))
    assert cfg.download.delay == 600
    assert cfg.tcmu_obd == sc.TcmuObdConfig(2.5, 0, 0)
    assert cfg.source.endswith("overlaybd.json")
    assert sc.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------ legacy fallbacks
def test_service_config_defaults_legacy_cache_keys():
    cfg = sc.from_dict({})
    assert cfg.effective_cache == sc.CacheConfig("file", "/opt/overlaybd/registry_cache", 4, 262144, 65536)

    legacy = sc.from_dict({"cacheType": "ocf", "registryCacheDir": "/legacy", "registryCacheSizeGB": 9,
                           "cacheConfig": {"cacheDir": "/ignored", "cacheSizeGB": 1,
                                           "refillSize": 4096 * 3, "blockSize": 4096}})
    assert legacy.effective_cache == sc.CacheConfig("ocf", "/legacy", 9, 4096 * 3, 4096)

    new = sc.from_dict({"cacheType": "ocf", "registryCacheDir": "/legacy", "registryCacheSizeGB": 9,
                        "cacheConfig": {"cacheType": "download", "cacheDir": "/new", "cacheSizeGB": 2}})
    assert new.effective_cache == sc.CacheConfig("download", "/new", 2, 262144, 65536)


def test_service_config_defaults_legacy_log_keys():
    legacy = sc.from_dict({"logLevel": 0, "logPath": "/l.log",
                           "logConfig": {"logLevel": 3, "logSizeMB": 99, "logRotateNum": 7}})
    assert legacy.effective_log == sc.LogConfig(0, "/l.log", 10, 3)
    new = sc.from_dict({"logLevel": 0, "logPath": "/l.log",
                        "logConfig": {"logLevel": 3, "logPath": "/n.log", "logSizeMB": 99,
                                      "logRotateNum": 7}})
    assert new.effective_log == sc.LogConfig(3, "/n.log", 99, 7)


def test_service_config_defaults_legacy_credential_keys():
    assert sc.from_dict({"credentialFilePath": "/c.json"}).effective_credential.mode == "file"
    assert sc.from_dict({"credentialFilePath": "/c.json"}).effective_credential.path == "/c.json"
    https = sc.from_dict({"credentialFilePath": "/c.json",
                          "credentialConfig": {"mode": "https", "path": "https://auth/x", "timeout": 3,
                                               "server_ca_path": "/ca.pem"}})
    assert https.effective_credential == sc.CredentialConfig("https", "https://auth/x", 3, "", "", "/ca.pem")


@pytest.mark.parametrize("cred,key", [({"mode": "ftp", "path": "/x"}, "credentialConfig.mode"),
                                      ({"mode": "uds"}, "credentialConfig.path")])
def test_service_config_defaults_bad_credentials(cred, key):
    with pytest.raises(ConfigError, match=key):
        sc.from_dict({"credentialConfig": cred}, "g.json")


# ------------------------------------------------------------------ unknown keys
def test_service_config_defaults_unknown_keys_warn_and_are_ignored():
    with pytest.warns(sc.UnknownKeyWarning) as rec:
        cfg = sc.from_dict({"bogus": 1, "cacheConfig": {"cacheSizeGB": 8, "refilSize": 4096},
                            "tcmuObd": {"readDeadline": 5}, "logConfig": {}}, "/etc/o.json")
    msgs = [str(w.message) for w in rec]
    assert any("/etc/o.json" in m and "unknown key bogus" in m for m in msgs)
    assert any("cacheConfig.refilSize" in m for m in msgs)
    assert any("tcmuObd.readDeadline" in m for m in msgs)
    assert cfg.unknown_keys == ("bogus", "cacheConfig.refilSize", "tcmuObd.readDeadline")
    assert cfg.cache_config.cache_size_gb == 8
    assert cfg.cache_config.refill_size == 262144


def test_service_config_defaults_odd_registryfs_version_warns():
    with pytest.warns(sc.ConfigWarning, match="registryFsVersion"):
        assert sc.from_dict({"registryFsVersion": "v3"}).registry_fs_version == "v3"
    with no_warnings():
        sc.from_dict({"registryFsVersion": "v1"})


# ------------------------------------------------------------------ strict typing
WRONG_TYPES = [
    ({"cacheConfig": {"cacheSizeGB": "4"}}, "cacheConfig.cacheSizeGB", '"4"'),
    ({"cacheConfig": {"cacheSizeGB": 4.0}}, "cacheConfig.cacheSizeGB", "4.0"),
    ({"cacheConfig": {"cacheSizeGB": -1}}, "cacheConfig.cacheSizeGB", "-1"),
    ({"cacheConfig": {"refillSize": 2**32}}, "cacheConfig.refillSize", "4294967296"),
    ({"cacheConfig": {"cacheSizeGB": True}}, "cacheConfig.cacheSizeGB", "true"),
    ({"cacheConfig": {"cacheType": None}}, "cacheConfig.cacheType", "null"),
    ({"cacheConfig": 5}, "cacheConfig", "5"),
    ({"cacheConfig": []}, "cacheConfig", "[]"),
    ({"logConfig": {"logRotateNum": 2**31}}, "logConfig.logRotateNum", "2147483648"),
    ({"logLevel": "debug"}, "logLevel", '"debug"'),
    ({"enableAudit": 1}, "enableAudit", "1"),
    ({"enableThread": "false"}, "enableThread", '"false"'),
    ({"ioEngine": -1}, "ioEngine", "-1"),
    ({"download": {"delay": "300"}}, "download.delay", '"300"'),
    ({"download": {"blockSize": -1}}, "download.blockSize", "-1"),
    ({"exporterConfig": {"updateInterval": -5}}, "exporterConfig.updateInterval", "-5"),
    ({"p2pConfig": {"address": 9731}}, "p2pConfig.address", "9731"),
    ({"credentialConfig": {"timeout": 1.5}}, "credentialConfig.timeout", "1.5"),
    ({"certConfig": {"certFile": ["a"]}}, "certConfig.certFile", '["a"]'),
    ({"userAgent": {}}, "userAgent", "{}"),
    ({"serviceConfig": {"enable": "yes"}}, "serviceConfig.enable", '"yes"'),
    ({"prefetchConfig": {"concurrency": 1e3}}, "prefetchConfig.concurrency", "1000.0"),
    ({"tcmuObd": {"registryTimeoutSec": "30"}}, "tcmuObd.registryTimeoutSec", '"30"'),
    ({"tcmuObd": {"registryRetries": -1}}, "tcmuObd.registryRetries", "-1"),
    ({"tcmuObd": {"readDeadlineSec": False}}, "tcmuObd.readDeadlineSec", "false"),
    ({"tcmuObd": {"readAheadBytes": -1}}, "tcmuObd.readAheadBytes", "-1"),
    ({"tcmuObd": {"registryMaxRequests": 2.5}}, "tcmuObd.registryMaxRequests", "2.5"),
    ({"tcmuObd": {"fetchBufferBytes": "64M"}}, "tcmuObd.fetchBufferBytes", '"64M"'),
]


@pytest.mark.parametrize("obj,key,shown", WRONG_TYPES, ids=[w[1] + "=" + w[2] for w in WRONG_TYPES])
def test_service_config_defaults_wrong_type_names_file_key_value(tmp_path, obj, key, shown):
    path = write(tmp_path, obj)
    with pytest.raises(ConfigError) as ei:
        sc.load(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: {key} = {shown}: expected "), msg


def test_service_config_defaults_top_level_and_json_errors(tmp_path):
    for text in ("[1, 2]", "{\"a\": ", "{\"ioEngine\": NaN}", "\xff"):
        path = write(tmp_path, text, "bad.json")
        with pytest.raises(ConfigError, match="bad.json"):
            sc.load(path)


def test_service_config_defaults_duplicate_key_keeps_first(tmp_path):
    path = write(tmp_path, '{"ioEngine": 1, "ioEngine": 7}')
    assert sc.load(path).io_engine == 1          # RapidJSON's FindMember finds the first


@pytest.mark.parametrize("tc,key", [({"registryTimeoutSec": 0}, "tcmuObd.registryTimeoutSec"),
                                    ({"readDeadlineSec": -1}, "tcmuObd.readDeadlineSec"),
                                    ({"registryMaxRequests": 0}, "tcmuObd.registryMaxRequests"),
                                    ({"fetchBufferBytes": 0}, "tcmuObd.fetchBufferBytes")])
def test_service_config_defaults_tcmuobd_ranges(tc, key):
    with pytest.raises(ConfigError, match=key):
        sc.from_dict({"tcmuObd": tc})


# ------------------------------------------------------------------ start-up checks
@pytest.mark.parametrize("size", [0, 1, 2048, 100000, 4096 * 3, 262144 + 4096, 2**31 + 4096])
def test_service_config_defaults_refill_size_rejected_for_file_cache(size):
    with pytest.raises(ConfigError) as ei:
        sc.from_dict({"cacheConfig": {"refillSize": size}}, "g.json")
    assert str(ei.value).startswith(f"g.json: cacheConfig.refillSize = {size}")
    assert "power of two" in str(ei.value)


@pytest.mark.parametrize("size", [4096, 8192, 1 << 20, 1 << 31])
def test_service_config_defaults_refill_size_accepted(size):
    assert sc.from_dict({"cacheConfig": {"refillSize": size}}).effective_cache.refill_size == size


def test_service_config_defaults_refill_size_only_checked_for_file_caches():
    sc.from_dict({"cacheConfig": {"cacheType": "ocf", "refillSize": 100000}})
    sc.from_dict({"cacheType": "download", "cacheConfig": {"refillSize": 100000}})   # legacy type
    with pytest.raises(ConfigError, match="cacheConfig.refillSize"):   # legacy type is file
        sc.from_dict({"cacheType": "file", "cacheConfig": {"refillSize": 100000}})
    sc.from_dict({"gzipCacheConfig": {"enable": False, "refillSize": 3}})
    with pytest.raises(ConfigError, match="gzipCacheConfig.refillSize = 3"):
        sc.from_dict({"gzipCacheConfig": {"enable": True, "refillSize": 3}})


def test_service_config_defaults_unknown_cache_type():
    with pytest.raises(ConfigError, match="cacheConfig.cacheType = \"nvme\""):
        sc.from_dict({"cacheConfig": {"cacheType": "nvme"}})
    with pytest.raises(ConfigError, match="^g: cacheType = \"\""):     # legacy key emptied
        sc.from_dict({"cacheType": ""}, "g")


def test_service_config_defaults_enable_thread_with_file_cache_rejected():
    with pytest.raises(ConfigError, match="enableThread"):
        sc.from_dict({"enableThread": True})                          # default cache is file
    with pytest.raises(ConfigError, match="enableThread.*cacheConfig.cacheType"):
        sc.from_dict({"enableThread": True, "cacheType": "ocf", "cacheConfig": {"cacheType": "file"}})
    assert sc.from_dict({"enableThread": True, "cacheType": "download"}).enable_thread
    assert sc.from_dict({"enableThread": True, "cacheConfig": {"cacheType": "ocf"}}).enable_thread


@pytest.mark.parametrize("engine", [0, 1, 2])
def test_service_config_defaults_io_engine_range_ok(engine):
    if engine == 0:
        with no_warnings():
            assert sc.from_dict({"ioEngine": engine}).io_engine == engine
        return
    with pytest.warns(sc.ConfigWarning, match=f"^<dict>: ioEngine = {engine} .*psync"):
        assert sc.from_dict({"ioEngine": engine}).io_engine == engine


# ------------------------------------------------------------------ the live-snapshot API
@pytest.mark.parametrize("address,host,port", [("http://127.0.0.1:9862", "127.0.0.1", 9862),
                                               ("http://localhost", "localhost", 80),
                                               ("http://[::1]:9000/", "::1", 9000)])
def test_service_config_defaults_snapshot_api_accepted(address, host, port):
    with no_warnings():
        cfg = sc.from_dict({"serviceConfig": {"enable": True, "address": address}})
    assert cfg.service_config.enable
    assert sc.service_address(cfg.service_config.address) == (host, port)
    with no_warnings():          # enabled with the default address
        assert sc.from_dict({"serviceConfig": {"enable": True}}).service_config.address == \
            "http://127.0.0.1:9862"


@pytest.mark.parametrize("address,why", [("ftp://127.0.0.1:9862", "scheme 'ftp'"),
                                         ("127.0.0.1:9862", "scheme ''"),
                                         ("http://:9862", "no host"),
                                         ("http://127.0.0.1:99999", "not a URL"),
                                         ("http://127.0.0.1:x", "not a URL"),
                                         ("http://127.0.0.1:0", "port 0"),
                                         ("http://127.0.0.1:9862/api", "only http://host:port"),
                                         ("", "scheme ''")])
def test_service_config_defaults_snapshot_api_bad_address_refused(tmp_path, address, why):
    path = write(tmp_path, {"serviceConfig": {"enable": True, "address": address}})
    with pytest.raises(ConfigError) as info:
        sc.load(path)
    assert str(info.value).startswith(f"{path}: serviceConfig.address = {json.dumps(address)}: "), info.value
    assert why in str(info.value)
    with no_warnings():          # not checked while the API is off, as overlaybd never reads it then
        sc.from_dict({"serviceConfig": {"enable": False, "address": address}})


def test_service_config_defaults_p2p_enable_accepted():
    with no_warnings():
        cfg = sc.from_dict({"p2pConfig": {"enable": True}})
    assert cfg.p2p_config.enable and cfg.p2p_config.address == "http://localhost:9731/accelerator"
    with no_warnings():      # overlaybd's own example leaves the scheme out
        assert sc.from_dict({"p2pConfig": {"enable": True, "address": "localhost:19145/dadip2p"}}) \
            .p2p_config.address == "localhost:19145/dadip2p"


@pytest.mark.parametrize("address,why", [("", "must not be empty"), ("   ", "must not be empty"),
                                         ("ftp://h:1/p", "scheme 'ftp'"),
                                         ("http://:19145/dadip2p", "no host"),
                                         ("localhost:99999/dadip2p", "not a URL"),
                                         ("http://h:1/p?x=1", "query or fragment")])
def test_service_config_defaults_p2p_bad_address_refused(tmp_path, address, why):
    path = write(tmp_path, {"p2pConfig": {"enable": True, "address": address}})
    with pytest.raises(ConfigError) as info:
        sc.load(path)
    text = str(info.value)
    assert str(path) in text and "p2pConfig.address" in text and json.dumps(address) in text \
        and why in text, text
    with no_warnings():        # only checked when P2P is on
        sc.from_dict({"p2pConfig": {"enable": False, "address": address}})


def test_service_config_defaults_gzip_cache_enable_accepted():
    """The gzip cache is served (tests/test_warp_gzip_cache.py): no warning."""
    with no_warnings():
        g = sc.from_dict({"gzipCacheConfig": {"enable": True}}, "g").gzip_cache_config
    assert g.enable and g.cache_dir == "/opt/overlaybd/gzip_cache" and g.refill_size == 1 << 20


def test_service_config_defaults_given_path_must_exist(tmp_path):
    absent = tmp_path / "absent.json"
    for load in (sc.load, sc.load_given):
        with pytest.raises(ConfigError, match=f"^{absent}: cannot read: No such file"):
            load(absent)
    assert sc.load_given(None, absent) == sc.ServiceConfig()      # nothing given: defaults
    present = write(tmp_path, {"ioEngine": 0, "download": {"delay": 7}})
    assert sc.load_given(None, present).download.delay == 7       # the default path is read


@pytest.mark.parametrize("engine", [3, 7, 2**32 - 1])
def test_service_config_defaults_io_engine_range_rejected(engine):
    with pytest.raises(ConfigError, match=f"ioEngine = {engine}"):
        sc.from_dict({"ioEngine": engine})


def test_service_config_defaults_exporter_port_checked_only_when_enabled():
    sc.from_dict({"exporterConfig": {"port": 0}})
    with pytest.raises(ConfigError, match="exporterConfig.port"):
        sc.from_dict({"exporterConfig": {"enable": True, "port": 70000}})


# ------------------------------------------------------------------ download merging
def test_service_config_defaults_download_absent_copies_global():
    glob = sc.from_dict({"download": {"enable": True, "delay": 10, "maxMBps": 0, "tryCnt": 2}})
    dl = sc.download_settings(None, glob)
    assert dl == sc.DownloadConfig(True, 10, 30, 0, 2, 262144)
    assert sc.download_settings(None, glob.download) == dl
    assert sc.download_settings(None, None) == sc.DownloadConfig()
    assert sc.download_settings(None, sc.load()) == sc.DownloadConfig(False, 300, 30, 100, 5, 262144)


def test_service_config_defaults_download_present_uses_builtin_defaults_per_key():
    glob = sc.from_dict({"download": {"enable": True, "delay": 10, "tryCnt": 2, "blockSize": 4096}})
    dl = sc.download_settings({"delay": 1}, glob)
    assert dl == sc.DownloadConfig(False, 1, 30, 100, 5, 262144)       # not the global values
    assert sc.download_settings({}, glob) == sc.DownloadConfig()


@pytest.mark.parametrize("extra", [0, -1, -2**31])
def test_service_config_defaults_download_delay_extra_nonpositive_is_30(extra):
    assert sc.download_settings({"delayExtra": extra}, None).delay_extra == 30
    glob = sc.from_dict({"download": {"delayExtra": extra}})
    assert glob.download.delay_extra == extra                           # stored as written
    assert sc.download_settings(None, glob).delay_extra == 30
    assert sc.download_settings({"delayExtra": 7}, glob).delay_extra == 7


def test_service_config_defaults_download_bad_types():
    with pytest.raises(ConfigError, match=r"^/d/config.v1.json: download.maxMBps = \"fast\""):
        sc.download_settings({"maxMBps": "fast"}, None, source="/d/config.v1.json")
    with pytest.raises(ConfigError, match="download = 3: expected a JSON object"):
        sc.download_settings(3, None)
    with pytest.raises(ConfigError, match="download.blockSize = 0"):
        sc.download_settings({"blockSize": 0}, None)
    with pytest.raises(ConfigError, match="download.blockSize = 0"):
        sc.from_dict({"download": {"blockSize": 0}})
    with pytest.warns(sc.UnknownKeyWarning, match="download.speed"):
        sc.download_settings({"speed": 1}, None)


def test_service_config_defaults_reload_download(tmp_path):
    path = write(tmp_path, {"download": {"enable": True, "delay": 5}})
    assert sc.reload_download(path) == sc.DownloadConfig(enable=True, delay=5)
    write(tmp_path, {"download": {"enable": True, "delay": 6}, "ioEngine": "bad elsewhere"})
    assert sc.reload_download(path).delay == 6                           # only download is read
    write(tmp_path, "{broken")
    with pytest.warns(sc.ConfigWarning):
        assert sc.reload_download(path) == sc.DownloadConfig()
    assert sc.reload_download(tmp_path / "absent") == sc.DownloadConfig()
    assert sc.reload_download(None) == sc.DownloadConfig()
    write(tmp_path, {"download": {"tryCnt": "x"}})
    with pytest.raises(ConfigError, match="download.tryCnt"):
        sc.reload_download(path)
