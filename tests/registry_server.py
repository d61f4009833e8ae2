"""Test helpers (not a test file): a real registry (Debian's docker-registry,
distribution 2.8) on 127.0.0.1 with no auth, htpasswd Basic auth, or token
auth backed by a small JWT token server written here; and helpers to push
blobs with plain requests, independent of the code under test.

Everything listens on 127.0.0.1 only, lives in a temporary directory, and is
stopped (kill + wait) when its context manager exits.  This is not a
general-purpose registry fixture: it knows exactly what the tests need.
"""
import base64
import datetime
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

SERVICE = "test-registry"
ISSUER = "test-issuer"


def require(*binaries):
    """Skip the calling test (module) if a binary is missing."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages docker-registry, apache2-utils; "
                    f"scripts/setup.sh installs them)", allow_module_level=True)


def require_jwt():
    try:
        import cryptography  # noqa: F401
        import jwt  # noqa: F401
    except ImportError:
        pytest.skip("token auth needs PyJWT and cryptography (pip install PyJWT cryptography)",
                    allow_module_level=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TokenServer:
    """A Docker token service: GET /token?service=..&scope=.. with optional
    Basic auth, answering a signed ES256 JWT.

    users: {name: password}; None lets anyone (anonymous included) have every
    action asked for.  expires_in: the lifetime the answer claims; lifetime:
    the JWT's real exp - now (defaults to expires_in).  hits: list of
    (user or None, scope) per token request.
    """

    def __init__(self, tmpdir, users=None, expires_in=300, lifetime=None):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users = users
        self.expires_in = expires_in
        self.lifetime = lifetime
        self.hits = []
        self.agents = []
        self.refuse = False
        self.expired_next = 0
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tcmu-obd test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert_der_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.cert_path = os.path.join(tmpdir, "token-cert.pem")
        with open(self.cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _user(self, header):
        """Authorization header -> (ok, user)."""
        if not header:
            return self.users is None, None
        try:
            scheme, b64 = header.split(" ", 1)
            user, _, pw = base64.b64decode(b64).decode().partition(":")
        except ValueError:
            return False, None
        if scheme.lower() != "basic":
            return False, None
        if self.users is None:
            return True, user
        return self.users.get(user) == pw, user

    def token(self, scopes, user):
        import jwt
        now = int(time.time())
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        life = self.expires_in if self.lifetime is None else self.lifetime
        if self.expired_next > 0:
            self.expired_next -= 1
            life = -600   # well past the registry's clock-skew leeway
        claims = {"iss": ISSUER, "aud": SERVICE, "sub": user or "", "iat": now, "nbf": now - 1,
                  "exp": now + life, "jti": uuid.uuid4().hex, "access": access}
        return jwt.encode(claims, self.key, "ES256", headers={"x5c": [self.cert_der_b64]})

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                parts = urlsplit(self.path)
                q = parse_qs(parts.query)
                ok, user = server._user(self.headers.get("Authorization"))
                server.hits.append((user, ",".join(q.get("scope", []))))
                server.agents.append(self.headers.get("User-Agent"))
                if parts.path != "/token" or q.get("service") != [SERVICE]:
                    return self._answer(400, {"error": "bad request"})
                if not ok or server.refuse:
                    return self._answer(401, {"error": "bad credentials"})
                tok = server.token(q.get("scope", []), user)
                self._answer(200, {"token": tok, "access_token": tok, "expires_in": server.expires_in,
                                   "issued_at": datetime.datetime.now(datetime.timezone.utc).isoformat()})

            def _answer(self, status, doc):
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


class Registry:
    """docker-registry serving a temp dir on 127.0.0.1:<free port>.

    auth: None, "basic" (htpasswd of `users`) or "token" (a TokenServer with
    `users`, reachable as .tokens).  token_kw goes to TokenServer.
    access_log: keep the registry's access log; access() lists its requests.
    """

    def __init__(self, auth=None, users=None, start_timeout=15.0, access_log=False, **token_kw):
        require("docker-registry")
        self.start_timeout = start_timeout     # the qemu guest (TCG) needs far longer
        if auth == "basic":
            require("htpasswd")
        if auth == "token":
            require_jwt()
        self.auth = auth
        self.users = users or {}
        self.token_kw = token_kw
        self.access_log = access_log
        self.tokens = None
        self.proc = None
        self.tmp = tempfile.mkdtemp(prefix="obd-registry-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self):
        auth = ""
        if self.auth == "basic":
            path = os.path.join(self.tmp, "htpasswd")
            with open(path, "w") as f:
                for user, pw in self.users.items():
                    f.write(subprocess.run(["htpasswd", "-Bbn", user, pw], check=True,
                                           capture_output=True, text=True).stdout.strip() + "\n")
            auth = f"auth:\n  htpasswd: {{realm: basic-realm, path: {path}}}\n"
        elif self.auth == "token":
            self.tokens = TokenServer(self.tmp, self.users or None, **self.token_kw).__enter__()
            auth = (f"auth:\n  token:\n    realm: {self.tokens.realm}\n    service: {SERVICE}\n"
                    f"    issuer: {ISSUER}\n    rootcertbundle: {self.tokens.cert_path}\n")
        cfg = os.path.join(self.tmp, "config.yml")
        with open(cfg, "w") as f:
            f.write("version: 0.1\n"
                    f"log: {{level: warn, accesslog: {{disabled: {str(not self.access_log).lower()}}}}}\n"
                    "storage:\n"
                    "  cache: {blobdescriptor: inmemory}\n"
                    f"  filesystem: {{rootdirectory: {os.path.join(self.tmp, 'data')}}}\n"
                    "  delete: {enabled: true}\n"
                    "http:\n"
                    f"  addr: 127.0.0.1:{self.port}\n"
                    "  secret: fixed-test-secret\n" + auth)
        self.log_path = os.path.join(self.tmp, "registry.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}: {self.log()}")
            try:
                if requests.get(self.url + "/v2/", timeout=1).status_code in (200, 401):
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry not ready after {self.start_timeout:.0f} s: "
                                   f"{self.log()}")
            time.sleep(0.02)

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def access(self):
        """(method, path, status) of every request in the access log so far
        (needs access_log=True)."""
        assert self.access_log, "Registry(access_log=True) keeps the access log"
        with open(self.log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        return [(m, p, int(st)) for m, p, st in
                re.findall(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) ', text)]

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self._log.close()
        if self.tokens is not None:
            self.tokens.__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers independent of tcmu_obd.remote.registry ------------------------------------------------

    def blob_url(self, repo, digest, base=None):
        return f"{base or self.url}/v2/{repo}/blobs/{digest}"

    def headers(self, repo, actions="pull,push"):
        """Authorization headers good for repo (fetched straight from the token server)."""
        user, pw = next(iter(self.users.items())) if self.users else (None, None)
        if self.auth == "basic":
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}
        if self.auth == "token":
            return {"Authorization": "Bearer " + self.tokens.token([f"repository:{repo}:{actions}"],
                                                                   user)}
        return {}

    def push_blob(self, repo, data):
        """POST then PUT ?digest= (monolithic); returns the digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        h = self.headers(repo)
        r = requests.post(f"{self.url}/v2/{repo}/blobs/uploads/", headers=h, timeout=10)
        assert r.status_code == 202, (r.status_code, r.text)
        loc = r.headers["Location"]
        r = requests.put(loc + ("&" if "?" in loc else "?") + "digest=" + digest, data=data,
                         headers=dict(h, **{"Content-Type": "application/octet-stream"}), timeout=30)
        assert r.status_code == 201, (r.status_code, r.text)
        return digest

    def get_blob(self, repo, digest):
        r = requests.get(self.blob_url(repo, digest), headers=self.headers(repo, "pull"), timeout=30)
        assert r.status_code == 200, (r.status_code, r.text[:200])
        return r.content


# -- a fault-injecting proxy in front of the real registry (SQLite test_vfs style) --------------

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
    `delay` seconds are slept before forwarding each blob GET (a far
    registry); `in_flight` / `peak` count the blob GETs being answered now
    and at most at once.
    """

    def __init__(self, upstream, cdn_headers=None):
        self.upstream = urlsplit(upstream)
        self.cdn_headers = cdn_headers or {}
        self.faults = []           # [fault, remaining or None]
        self.probes = False
        self.seen = []             # (method, path, range, fault or None)
        self.delay = 0.0
        self.in_flight = 0
        self.peak = 0
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

    def inject(self, fault, times=1, probes=False, only=None):
        """only: spoil just requests whose path contains this text (a digest)."""
        with self.lock:
            self.faults = [[fault, times]]
            self.probes = probes
            self.only = only

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
            if getattr(self, "only", None) and self.only not in path:
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
                blob_get = self.command == "GET" and "/blobs/sha256:" in path
                with proxy.lock:
                    proxy.seen.append((self.command, self.path, self.headers.get("Range"), fault))
                    if blob_get:
                        proxy.in_flight += 1
                        proxy.peak = max(proxy.peak, proxy.in_flight)
                counted = blob_get
                try:
                    if blob_get and proxy.delay:
                        time.sleep(proxy.delay)
                    if fault is None:
                        answer = proxy.forward(self.command, path, headers, body)
                        with proxy.lock:        # answered: no longer in flight (counted before the client
                            proxy.in_flight -= counted     # can see the answer and send its next request)
                        counted = False
                        return self._send(*answer)
                    if fault.isdigit() and not hasattr(self, "_f_" + fault):
                        return self._answer(int(fault))     # any other status, e.g. "400"
                    return getattr(self, "_f_" + fault)(path, headers)
                finally:
                    if counted:
                        with proxy.lock:
                            proxy.in_flight -= 1

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
