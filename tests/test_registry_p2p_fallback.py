"""P2P proxy routing of blob reads (p2pConfig) on the client side, against a
real docker-registry on 127.0.0.1: the proxy URL's form, and the fallback to
the registry when the proxy is down or answers badly, with its log line,
under each auth mode.

This is not a test of a real P2P proxy (dadi-p2proxy could not be built on
this machine; tests/p2p/build_proxy.sh says why): no stand-in proxy is used.
A "proxy down" is a closed loopback port; a "proxy that answers badly" is the
registry itself at the proxy address, which answers the proxied path with an
error, and whose access log shows the exact request line the client sent.
"""
import logging
import random
from urllib.parse import quote

import pytest
from hypothesis import given, settings, strategies as st

from registry_server import Registry, free_port, require

from tcmu_obd import service_config as sc
from tcmu_obd.remote.imageref import client_from_service_config
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings, blob_url, p2p_url

require("docker-registry")

USERS = {"alice": "s3cret"}
REPO = "lib/app"
BLOB = random.Random(77).randbytes(3 * (1 << 20) + 4321)
LOGGER = "tcmu_obd.remote.registry"


class Creds:
    def lookup(self, url):
        return ("alice", "s3cret")


@pytest.fixture(scope="module", params=["anonymous", "basic", "token"])
def reg(request):
    mode = None if request.param == "anonymous" else request.param
    with Registry(mode, users=USERS, access_log=True) as r:
        r.digest = r.push_blob(REPO, BLOB)
        yield r


def client(address, **kw):
    kw.setdefault("retries", 2)
    kw.setdefault("backoff", 0.001)
    return RegistryClient(RegistrySettings(p2p_address=address, **kw), Creds())


def ranges(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        off = rng.randrange(len(BLOB))
        yield off, rng.randrange(1, 300_000)


def fallback_records(caplog):
    return [r for r in caplog.records if r.name == LOGGER and "p2p proxy" in r.getMessage()
            and "reading from the registry directly" in r.getMessage()]


# ------------------------------------------------------------------ the URL form
@settings(max_examples=200, deadline=None)
@given(host=st.from_regex(r"[a-z][a-z0-9.-]{0,20}(:[0-9]{1,5})?", fullmatch=True),
       prefix=st.from_regex(r"(/[A-Za-z0-9_-]{1,10}){0,3}/?", fullmatch=True),
       scheme=st.sampled_from(["", "http://", "https://"]),
       path=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40))
def test_registry_p2p_url_is_address_slash_url(host, prefix, scheme, path):
    url = "https://reg.example/v2/" + path
    got = p2p_url(scheme + host + prefix, url)
    base = (scheme or "http://") + host + prefix.rstrip("/")
    assert got == base + "/" + url          # overlaybd: plain concatenation with one '/'
    assert got.endswith("/" + url) and got.count("/" + url) >= 1


def test_registry_p2p_service_config_sets_the_address():
    on = sc.from_dict({"p2pConfig": {"enable": True, "address": "localhost:19145/dadip2p"}})
    with client_from_service_config(on) as c:
        assert c.settings.p2p_address == "localhost:19145/dadip2p"
    off = sc.from_dict({"p2pConfig": {"enable": False, "address": "localhost:19145/dadip2p"}})
    with client_from_service_config(off) as c:
        assert c.settings.p2p_address == ""


# ------------------------------------------------------------------ proxy down
def test_registry_p2p_proxy_down_falls_back_with_one_warning(reg, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    address = f"http://127.0.0.1:{free_port()}/dadip2p"       # nothing listens there
    url = blob_url(f"{reg.url}/v2/{REPO}/blobs/", reg.digest)
    with client(address, p2p_recheck=3600) as c:
        blob = c.open_blob(url)
        assert blob.size == len(BLOB)
        for off, n in ranges(40, 1):
            assert blob.read(off, n) == BLOB[off:off + n], (off, n)
    recs = fallback_records(caplog)
    assert len(recs) == 1 and recs[0].levelno == logging.WARNING, [r.getMessage() for r in recs]
    msg = recs[0].getMessage()
    assert address in msg and url in msg and "connect" in msg.lower(), msg


def test_registry_p2p_proxy_down_is_tried_again_after_recheck(reg, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    address = f"127.0.0.1:{free_port()}/dadip2p"                # no scheme: http
    url = blob_url(f"{reg.url}/v2/{REPO}/blobs/", reg.digest)
    with client(address, p2p_recheck=0) as c:
        blob = c.open_blob(url)
        for off, n in ranges(5, 2):
            assert blob.read(off, n) == BLOB[off:off + n]
    recs = fallback_records(caplog)
    # every request (size probe if any, and each read) tried the proxy, then the registry
    assert len(recs) >= 5, [r.getMessage() for r in recs]
    assert [r.levelno for r in recs].count(logging.WARNING) == len(recs)


# ------------------------------------------------------------------ proxy answers badly
def test_registry_p2p_request_form_and_fallback_on_bad_answer(reg, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    address = f"{reg.url}/dadip2p/"               # the registry has no such route: 404
    url = blob_url(f"{reg.url}/v2/{REPO}/blobs/", reg.digest)
    before = len(reg.access())
    with client(address, p2p_recheck=3600, retries=2) as c:
        blob = c.open_blob(url)
        off, n = 1000, 200_000
        assert blob.read(off, n) == BLOB[off:off + n]
        assert blob.read(0, 10) == BLOB[:10]          # the proxy is skipped now
    seen = reg.access()[before:]
    # the resolved URL appended to the address with one '/', tried 1 + retries times (the
    # registry answers it with a path-cleaning redirect the client follows, then 404)
    want = "/dadip2p/" + url
    sent = [(m, p, s) for m, p, s in seen if p in (want, quote(want, safe="/:@"))]
    assert len(sent) == 3 and all(m == "GET" for m, _, _ in sent), seen
    assert all(s >= 300 for m, p, s in seen if p.startswith("/dadip2p/")), seen
    direct = [p for m, p, s in seen if m == "GET" and s == 206 and p.endswith(reg.digest)
              and not p.startswith("/dadip2p/")]
    assert len(direct) >= 2, seen
    assert len(fallback_records(caplog)) == 1
