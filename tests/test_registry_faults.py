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
import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from registry_server import Registry, free_port, require

from tcmu_obd.errors import (BlobNotFound, ConnectionFailed, RemoteError, RemoteTimeout,
                             TooManyRequests, UnexpectedResponse)
from tcmu_obd.registry import RegistryClient, RegistrySettings

require("docker-registry")

REPO = "fault/repo"
BLOB = random.Random(4321).randbytes(3 * (1 << 20) + 999)
DEADLINE = 1.5
FAST = dict(timeout=0.4, read_deadline=DEADLINE, retries=3, backoff=0.01, max_backoff=0.1)
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
       "transfer-encoding", "upgrade", "content-length"}


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass    # clients that gave up (broken pipes) are the point of these tests


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of `upstream`.

    inject(fault, times): spoil the next `times` matching requests (None:
    all of them).  Matching requests are blob GETs with a Range other than the
    1-byte probe (so open_blob is left alone), or every blob GET with
    probes=True.  `/cdn/...` paths are forwarded with `cdn_headers` added, and
    record whether the client sent Authorization there (redirect tests).
    """

    def __init__(self, upstream, cdn_headers=None):
        self.upstream = urlsplit(upstream)
        self.cdn_headers = cdn_headers or {}
        self.faults = []           # [fault, remaining or None]
        self.probes = False
        self.seen = []             # (method, path, range, fault or None)
        self.cdn_auth = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _QuietServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def inject(self, fault, times=1, probes=False):
        with self.lock:
            self.faults = [[fault, times]]
            self.probes = probes

    def inject_random(self, faults, rate, seed):
        rng = random.Random(seed)
        with self.lock:
            self.faults = [["random", None]]
            self.random = (rng, faults, rate)

    def clear(self):
        with self.lock:
            self.faults = []

    def _pick(self, method, path, rng_header):
        with self.lock:
            if method != "GET" or "/blobs/sha256:" not in path or path.startswith("/cdn/"):
                return None
            if rng_header == "bytes=0-0" and not self.probes:
                return None
            if not self.faults:
                return None
            entry = self.faults[0]
            fault = entry[0]
            if fault == "random":
                rng, faults, rate = self.random
                return rng.choice(faults) if rng.random() < rate else None
            if entry[1] is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    self.faults.pop(0)
            return fault

    def forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                path = self.path
                if path.startswith("/cdn/"):
                    proxy.cdn_auth.append(self.headers.get("Authorization"))
                    path = path[len("/cdn"):]
                    headers.update(proxy.cdn_headers)
                fault = proxy._pick(self.command, path, self.headers.get("Range"))
                proxy.seen.append((self.command, self.path, self.headers.get("Range"), fault))
                if fault is None:
                    return self._send(*proxy.forward(self.command, path, headers, body))
                return getattr(self, "_f_" + fault)(path, headers)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def _send(self, status, headers, body, length=None, cut=None):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

            def _answer(self, status, text=b"injected fault\n"):
                self._send(status, [("Content-Type", "text/plain")], text)

            def _f_drop(self, path, headers):
                self.close_connection = True

            def _f_reset(self, path, headers):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True

            def _f_stall(self, path, headers):
                proxy.release.wait(20)
                self.close_connection = True

            def _f_stall_body(self, path, headers):
                status, hdrs, body = proxy.forward("GET", path, headers, None)
                self.send_response(status)
                for k, v in hdrs:
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 3])
                self.wfile.flush()
                proxy.release.wait(20)
                self.close_connection = True

            def _f_500(self, path, headers):
                self._answer(500)

            def _f_503(self, path, headers):
                self._answer(503)

            def _f_429(self, path, headers):
                self._answer(429)

            def _f_404(self, path, headers):
                self._answer(404)

            def _f_noauth(self, path, headers):
                headers.pop("Authorization", None)
                self._send(*proxy.forward("GET", path, headers, None))

            def _f_truncate(self, path, headers):
                status, hdrs, body = proxy.forward("GET", path, headers, None)
                self._send(status, hdrs, body, length=len(body), cut=len(body) // 2)

            def _f_short206(self, path, headers):
                # a well-formed answer whose body is shorter than the range it claims
                status, hdrs, body = proxy.forward("GET", path, headers, None)
                self._send(status, hdrs, body[:-1] if len(body) > 1 else b"")

            def _f_flip(self, path, headers):
                status, hdrs, body = proxy.forward("GET", path, headers, None)
                body = bytearray(body)
                if body:
                    body[len(body) // 2] ^= 0xFF
                self._send(status, hdrs, bytes(body))

            def _f_wrong_range(self, path, headers):
                a, b = headers["Range"].split("=")[1].split("-")
                headers["Range"] = f"bytes={int(a) + 1}-{int(b) + 1}"
                self._send(*proxy.forward("GET", path, headers, None))

            def _f_full200(self, path, headers):
                headers.pop("Range", None)
                status, hdrs, body = proxy.forward("GET", path, headers, None)
                assert status == 200
                self._send(status, hdrs, body)

            def _f_redirect(self, path, headers):
                if "Authorization" not in self.headers:
                    return self._send(*proxy.forward("GET", path, headers, None))
                self._send(307, [("Location", f"{proxy.url}/cdn{path}")], b"")

        return Handler


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


def test_registry_faults_404_on_data_is_not_retried_until_the_deadline(proxy):
    with RegistryClient(RegistrySettings(**FAST)) as c:
        blob = c.open_blob(proxy.blob_url)
        proxy.inject("404", times=None)
        err, took = timed(blob.read, 0, 100)
        assert isinstance(err, BlobNotFound) and "404" in str(err)
        assert took < DEADLINE
        assert sum(1 for s in proxy.seen if s[3] == "404") == 1 + FAST["retries"]


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
