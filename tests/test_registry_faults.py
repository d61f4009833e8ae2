"""Fault injection between the registry client and a real docker-registry: a
loopback HTTP proxy written here forwards every request to the registry and,
when told, spoils the answer (drops the connection, stalls past the timeout,
answers 500/429/503/404, cuts or shortens the body, flips a byte, answers a
different range, or a 200 with the whole blob).

What the client layer guarantees, and what is checked: every read returns
exactly the asked bytes, or raises a RemoteError subclass within about the
configured read_deadline, never hangs and never returns a body of the wrong
length.  It cannot notice a flipped byte inside a well-formed answer (raw
blobs carry no per-range checksum; ZFile's CRCs, one layer up, do), so the
flip test only pins down that the length and position are still right.
"""
import random
import threading
import time

import pytest

from registry_server import FaultProxy, Registry, require

from tcmu_obd.errors import (AuthError, BlobNotFound, ConnectionFailed, RemoteError, RemoteTimeout,
                             TooManyRequests, UnexpectedResponse)
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings

require("docker-registry")

REPO = "fault/repo"
BLOB = random.Random(4321).randbytes(3 * (1 << 20) + 999)
DEADLINE = 1.5
FAST = dict(timeout=0.4, read_deadline=DEADLINE, retries=3, backoff=0.01, max_backoff=0.1)


@pytest.fixture(scope="module")
def registry():
    with Registry() as r:
        r.digest = r.push_blob(REPO, BLOB)
        yield r


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.url) as p:
        p.blob_url = registry.blob_url(REPO, registry.digest, base=p.url)
        yield p


def timed(fn, *a):
    t = time.monotonic()
    try:
        return fn(*a), time.monotonic() - t
    except RemoteError as e:
        return e, time.monotonic() - t


BOUND = 3 * DEADLINE + 1.0
TRANSIENT = ["drop", "reset", "stall", "stall_body", "500", "503", "429", "truncate",
             "short206", "wrong_range"]


@pytest.mark.parametrize("fault", TRANSIENT + ["full200"])
def test_registry_faults_transient_fault_is_retried(proxy, fault):
    with RegistryClient(RegistrySettings(**FAST)) as c:
        blob = c.open_blob(proxy.blob_url)
        proxy.inject(fault, times=2)
        for off, length in ((1000, 70000), (len(BLOB) - 5000, 5000), (0, 10)):
            got, took = timed(blob.read, off, length)
            assert got == BLOB[off:off + length], (fault, off, got)
            assert took < BOUND
        hits = [s for s in proxy.seen if s[3] == fault]
        assert len(hits) == 2


def test_registry_faults_full200_is_sliced_not_retried(proxy):
    with RegistryClient(RegistrySettings(**FAST)) as c:
        blob = c.open_blob(proxy.blob_url)
        proxy.inject("full200", times=None)
        for off, length in ((0, 1), (123456, 4096), (len(BLOB) - 1, 1), (0, len(BLOB))):
            n = len(proxy.seen)
            assert blob.read(off, length) == BLOB[off:off + length]
            assert len(proxy.seen) == n + 1     # one request, no retry


@pytest.mark.parametrize("fault,final", [
    ("drop", ConnectionFailed), ("stall", RemoteTimeout), ("stall_body", RemoteTimeout),
    ("500", UnexpectedResponse), ("429", TooManyRequests), ("truncate", ConnectionFailed),
    ("short206", ConnectionFailed), ("wrong_range", UnexpectedResponse)])
def test_registry_faults_persistent_fault_raises_within_deadline(proxy, fault, final):
    with RegistryClient(RegistrySettings(**FAST)) as c:
        blob = c.open_blob(proxy.blob_url)
        proxy.inject(fault, times=None)
        err, took = timed(blob.read, 4096, 65536)
        assert isinstance(err, RemoteTimeout), err
        assert isinstance(err.__cause__, final), repr(err.__cause__)
        assert blob.url in str(err) and "gave up" in str(err)
        assert DEADLINE * 0.5 < took < BOUND, took
        # once the fault is gone the same blob reads again
        proxy.clear()
        assert blob.read(4096, 65536) == BLOB[4096:4096 + 65536]


def test_registry_faults_404_on_data_is_not_retried(proxy):
    with RegistryClient(RegistrySettings(**FAST)) as c:
        blob = c.open_blob(proxy.blob_url)
        proxy.inject("404", times=None)
        err, took = timed(blob.read, 0, 100)
        assert isinstance(err, BlobNotFound) and "404" in str(err)
        assert took < DEADLINE
        assert sum(1 for s in proxy.seen if s[3] == "404") == 1


PERMANENT = {"400": UnexpectedResponse, "404": BlobNotFound, "405": UnexpectedResponse,
             "410": UnexpectedResponse, "451": UnexpectedResponse}


@pytest.mark.parametrize("status", sorted(PERMANENT))
def test_registry_faults_permanent_status_fails_at_once(proxy, status):
    """A status no retry can change fails the read on its first answer,
    naming the URL and the status; the registry is asked once."""
    with RegistryClient(RegistrySettings(**dict(FAST, read_deadline=30))) as c:
        blob = c.open_blob(proxy.blob_url)
        proxy.inject(status, times=None)
        n = len(proxy.seen)
        err, _ = timed(blob.read, 4096, 65536)
        assert type(err) is PERMANENT[status], repr(err)
        assert err.status == int(status) and blob.url in str(err) and f"HTTP {status}" in str(err)
        assert [s[3] for s in proxy.seen[n:]] == [status]
        # the client is not stuck: the next read, once the registry answers, works
        proxy.clear()
        assert blob.read(4096, 65536) == BLOB[4096:4096 + 65536]


@pytest.mark.parametrize("status", ["408", "502", "504"])
def test_registry_faults_transient_status_is_retried(proxy, status):
    with RegistryClient(RegistrySettings(**FAST)) as c:
        blob = c.open_blob(proxy.blob_url)
        proxy.inject(status, times=2)
        assert blob.read(4096, 65536) == BLOB[4096:4096 + 65536]
        assert sum(1 for s in proxy.seen if s[3] == status) == 2


def test_registry_faults_open_of_a_missing_blob_asks_once():
    """open (a meta operation, which retries transient failures) of a blob
    the registry does not have: one GET in the registry's own access log."""
    with Registry(access_log=True) as r:
        url = r.blob_url(REPO, "sha256:" + "0" * 64)
        with RegistryClient(RegistrySettings(**FAST)) as c:
            err, _ = timed(c.open_blob, url)
        assert isinstance(err, BlobNotFound) and url in str(err) and "HTTP 404" in str(err), repr(err)
        assert [a for a in r.access() if a[0] == "GET" and "0" * 64 in a[1]] == \
            [("GET", f"/v2/{REPO}/blobs/sha256:{'0' * 64}", 404)]


def test_registry_faults_401_on_data_reauthenticates_once():
    """A 401 to a read made with a cached token earns one fresh token (it may
    have expired); a 401 to that one fails the read."""
    with Registry("token", users={"alice": "s3cret"}) as r:
        digest = r.push_blob(REPO, BLOB[:100000])
        with FaultProxy(r.url) as p:
            creds = type("C", (), {"lookup": lambda self, url: ("alice", "s3cret")})()
            with RegistryClient(RegistrySettings(**dict(FAST, read_deadline=30)), creds) as c:
                blob = c.open_blob(r.blob_url(REPO, digest, base=p.url))
                p.inject("noauth", times=None)
                err, _ = timed(blob.read, 10, 50000)
                assert isinstance(err, AuthError) and err.status == 401 and blob.url in str(err), repr(err)
                assert sum(1 for s in p.seen if s[3] == "noauth") == 2


def test_registry_faults_open_fails_within_deadline(proxy):
    proxy.inject("stall", times=None, probes=True)
    with RegistryClient(RegistrySettings(**FAST)) as c:
        err, took = timed(c.open_blob, proxy.blob_url)
    assert isinstance(err, RemoteError) and took < BOUND, (err, took)


def test_registry_faults_flipped_byte_passes_through_with_the_right_length(proxy):
    """Documented limit: a byte flipped inside a well-formed 206 is returned as is."""
    with RegistryClient(RegistrySettings(**FAST)) as c:
        blob = c.open_blob(proxy.blob_url)
        proxy.inject("flip", times=1)
        got = blob.read(5000, 10000)
        want = BLOB[5000:15000]
        assert len(got) == len(want)
        assert [i for i in range(len(want)) if got[i] != want[i]] == [5000]
        assert blob.read(5000, 10000) == want


def test_registry_faults_no_deadline_keeps_retrying(proxy):
    with RegistryClient(RegistrySettings(**dict(FAST, read_deadline=0))) as c:
        blob = c.open_blob(proxy.blob_url)
        proxy.inject("503", times=8)
        assert blob.read(77, 7777) == BLOB[77:77 + 7777]


def test_registry_faults_random_faults_never_give_wrong_bytes(proxy):
    kinds = ["drop", "reset", "500", "429", "truncate", "short206", "wrong_range", "full200"]
    proxy.inject_random(kinds, rate=0.4, seed=11)
    outcomes = []
    with RegistryClient(RegistrySettings(**FAST)) as c:
        blob = c.open_blob(proxy.blob_url)

        def worker(seed):
            rng = random.Random(seed)
            for _ in range(12):
                off, length = rng.randrange(len(BLOB)), rng.randrange(1, 300000)
                got, took = timed(blob.read, off, length)
                ok = got == BLOB[off:off + length] if isinstance(got, bytes) else \
                    isinstance(got, RemoteError)
                outcomes.append((ok, took, isinstance(got, bytes)))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(outcomes) == 48
    assert all(ok for ok, _, _ in outcomes)
    assert all(took < BOUND for _, took, _ in outcomes)
    assert sum(1 for _, _, data in outcomes if data) >= 40   # retries do get through


def test_registry_faults_401_on_data_reauthenticates():
    with Registry("token", users={"alice": "s3cret"}) as r:
        digest = r.push_blob(REPO, BLOB[:100000])
        with FaultProxy(r.url) as p:
            creds = type("C", (), {"lookup": lambda self, url: ("alice", "s3cret")})()
            with RegistryClient(RegistrySettings(**FAST), creds) as c:
                blob = c.open_blob(r.blob_url(REPO, digest, base=p.url))
                before = len(r.tokens.hits)
                p.inject("noauth", times=1)     # the registry sees no token: a real 401
                assert blob.read(10, 50000) == BLOB[10:50010]
                assert len(r.tokens.hits) == before + 1


def test_registry_faults_redirect_target_gets_no_authorization():
    with Registry("basic", users={"alice": "s3cret"}) as r:
        digest = r.push_blob(REPO, BLOB)
        with FaultProxy(r.url, cdn_headers=r.headers(REPO)) as p:
            p.inject("redirect", times=None, probes=True)
            creds = type("C", (), {"lookup": lambda self, url: ("alice", "s3cret")})()
            with RegistryClient(RegistrySettings(**FAST), creds) as c:
                blob = c.open_blob(r.blob_url(REPO, digest, base=p.url))
                assert blob.size == len(BLOB)
                assert blob.read(999, 123456) == BLOB[999:999 + 123456]
                assert c.resolve(blob.url).actual_url.startswith(p.url + "/cdn/")
            assert p.cdn_auth and all(a is None for a in p.cdn_auth)
