"""RegistryClient honours the proxy environment variables (HTTP_PROXY,
NO_PROXY) as requests does, though it reads the environment once per
origin instead of on every request (docs/runtime.md, TLS and proxies).

The registry is the real test registry; the forward proxy is the tests'
FaultProxy, which forwards an absolute-form request line to the registry
and records every request it sees.
"""
import pytest

from registry_server import FaultProxy, Registry
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings

REPO = "obd/envproxy"
DATA = bytes(range(256)) * 64


@pytest.fixture(scope="module")
def registry():
    with Registry() as r:
        r.digest = r.push_blob(REPO, DATA)
        yield r


@pytest.fixture
def env(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def _read(registry):
    with RegistryClient(RegistrySettings(timeout=10, read_deadline=20)) as client:
        blob = client.open_blob(registry.blob_url(REPO, registry.digest))
        return blob.read(100, 1000)


def test_registry_env_proxy_used(registry, env):
    with FaultProxy(registry.url) as proxy:
        env.setenv("HTTP_PROXY", proxy.url)
        assert _read(registry) == DATA[100:1100]
        paths = [path for _m, path, _r, _f in proxy.seen]
        assert any(p.startswith(registry.url + "/v2/" + REPO + "/blobs/") for p in paths), paths


def test_registry_env_proxy_no_proxy_bypasses(registry, env):
    with FaultProxy(registry.url) as proxy:
        env.setenv("HTTP_PROXY", proxy.url)
        env.setenv("NO_PROXY", "127.0.0.1")
        assert _read(registry) == DATA[100:1100]
        assert proxy.seen == []
