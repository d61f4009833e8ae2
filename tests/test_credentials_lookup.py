"""Credential lookup: overlaybd's first-match rule over cred.json (document
order, exact keys, not longest prefix), the `auth` base64 forms and the
entries that are skipped, the docker config.json fallback, and the http,
https (CA pinning, client certificate) and Unix-socket credential services
against small local servers.
"""
import base64
import datetime
import json
import socketserver
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tcmu_obd.remote.credentials import CredentialProvider, candidate_keys, decode_auth
from tcmu_obd.errors import ConfigError

URL = "https://reg.example.com:5000/v2/team/app/web/blobs/sha256:" + "ab" * 32


def b64(text):
    return base64.b64encode(text.encode()).decode()


def from_file(tmp_path, doc, url=URL, raw=None):
    path = tmp_path / "cred.json"
    path.write_text(raw if raw is not None else json.dumps(doc))
    return CredentialProvider(mode="file", path=str(path), docker_config=False).lookup(url)


def test_credentials_lookup_candidate_keys():
    assert candidate_keys(URL) == ["reg.example.com:5000", "reg.example.com:5000/team",
                                   "reg.example.com:5000/team/app",
                                   "reg.example.com:5000/team/app/web"]
    assert candidate_keys("http://h/v2/r/blobs/uploads/") == ["h", "h/r"]
    assert candidate_keys("http://h/v2/r/manifests/latest") == ["h", "h/r"]
    assert candidate_keys("http://h/v2/a/blobs/blobs/sha256:00") == ["h", "h/a", "h/a/blobs"]
    assert candidate_keys("http://u@h/v2/r/blobs/sha256:00") == ["h", "h/r"]


def test_credentials_lookup_first_match_in_document_order(tmp_path):
    host = "reg.example.com:5000"
    auths = {host + "/team": {"username": "short", "password": "1"},
             host + "/team/app/web": {"username": "long", "password": "2"}}
    assert from_file(tmp_path, {"auths": auths}) == ("short", "1")      # not longest prefix
    auths = dict(reversed(list(auths.items())))
    assert from_file(tmp_path, {"auths": auths}) == ("long", "2")
    # the host alone matches too, when it comes first
    auths = {host: {"auth": b64("hostuser:x")}, host + "/team": {"username": "t", "password": "y"}}
    assert from_file(tmp_path, {"auths": auths}) == ("hostuser", "x")


def test_credentials_lookup_keys_must_be_equal(tmp_path):
    for key in ("https://reg.example.com:5000", "reg.example.com:5000/", "reg.example.com",
                "reg.example.com:5000/team/ap", "reg.example.com:5000/team/app/web/x",
                "reg.example.com:5000/v2/team", "REG.example.com:5000"):
        assert from_file(tmp_path, {"auths": {key: {"username": "u", "password": "p"}}}) is None, key


def test_credentials_lookup_duplicate_keys_first_wins(tmp_path):
    raw = ('{"auths": {"reg.example.com:5000": {"username": "first", "password": "1"},'
           ' "reg.example.com:5000": {"username": "second", "password": "2"}}}')
    assert from_file(tmp_path, None, raw=raw) == ("first", "1")


def test_credentials_lookup_auth_base64_forms():
    assert decode_auth(b64("alice:s3cret")) == ("alice", "s3cret")
    assert decode_auth(b64("alice:pa:ss:")) == ("alice", "pa:ss:")      # split at the first ':'
    assert decode_auth(b64("alice:")) == ("alice", "")
    assert decode_auth(b64(":pw")) == ("", "pw")
    assert decode_auth(b64("al:x").rstrip("=")) == ("al", "x")           # padding left off
    assert decode_auth(" " + b64("alice:s3cret") + "\n") == ("alice", "s3cret")
    url_safe = base64.urlsafe_b64encode(b"u:\xfb\xff?").decode()
    assert "-" in url_safe or "_" in url_safe
    assert decode_auth(url_safe) is None                                # not UTF-8
    assert decode_auth(base64.urlsafe_b64encode("u:é>>>?".encode()).decode()) == ("u", "é>>>?")
    assert decode_auth(b64("no-colon")) is None
    assert decode_auth("!!!not base64!!!") is None
    assert decode_auth(12) is None


def test_credentials_lookup_skipped_entries_fall_through(tmp_path):
    host = "reg.example.com:5000"
    auths = [
        (host, {"auth": b64("nocolon")}),                        # skipped: no ':'
        (host + "/team", {"auth": "%%%"}),                       # skipped: not base64
        (host + "/team/app", {"username": "only-user"}),         # skipped: no password
        (host + "/team/app", {"password": "only-password"}),     # skipped: no username
        (host + "/team/app", {"username": "", "password": "p"}),  # skipped: empty username
        (host + "/team/app/web", {"auth": b64("bob:pw"), "username": "x", "password": "y"}),
        (host, {"username": "late", "password": "z"}),
    ]
    raw = '{"auths": {' + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in auths) + "}}"
    assert from_file(tmp_path, None, raw=raw) == ("bob", "pw")   # auth wins over username/password


def test_credentials_lookup_missing_or_bad_file_is_anonymous(tmp_path):
    p = CredentialProvider(mode="file", path=str(tmp_path / "nope.json"), docker_config=False)
    assert p.lookup(URL) is None
    assert from_file(tmp_path, None, raw="{broken") is None
    assert from_file(tmp_path, {"auths": []}) is None
    assert from_file(tmp_path, {"other": 1}) is None


def test_credentials_lookup_legacy_file_when_mode_is_empty(tmp_path):
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps({"auths": {"reg.example.com:5000": {"username": "l",
                                                                   "password": "p"}}}))
    assert CredentialProvider(legacy_file=str(path), docker_config=False).lookup(URL) == ("l", "p")


def test_credentials_lookup_bad_settings():
    with pytest.raises(ConfigError):
        CredentialProvider(mode="ftp", path="x")
    with pytest.raises(ConfigError):
        CredentialProvider(mode="http", path="")


@pytest.fixture
def docker_config(tmp_path, monkeypatch):
    d = tmp_path / "docker"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))

    def write(auths):
        (d / "config.json").write_text(json.dumps({"auths": auths, "credsStore": "desktop"}))
    return write


def test_credentials_lookup_docker_config_fallback(tmp_path, docker_config):
    none = CredentialProvider(legacy_file=str(tmp_path / "absent.json"))
    docker_config({"https://reg.example.com:5000/v1/": {"auth": b64("dk:1")}})
    assert none.lookup(URL) == ("dk", "1")
    docker_config({"other.example.com": {"auth": b64("no:0")},
                   "reg.example.com:5000": {"auth": b64("bare:2")}})
    assert none.lookup(URL) == ("bare", "2")
    docker_config({"http://reg.example.com:5000": {"username": "plain", "password": "3"}})
    assert none.lookup(URL) == ("plain", "3")
    docker_config({"https://index.docker.io/v1/": {"auth": b64("hub:4")}})
    assert none.lookup("https://registry-1.docker.io/v2/library/redis/blobs/sha256:00") == \
        ("hub", "4")
    assert none.lookup(URL) is None
    # cred.json wins when it matches; docker config only fills the gap; it can be turned off
    docker_config({"reg.example.com:5000": {"auth": b64("docker:5")}})
    cred = tmp_path / "cred.json"
    cred.write_text(json.dumps({"auths": {"reg.example.com:5000/team": {"auth": b64("cred:6")}}}))
    assert CredentialProvider(mode="file", path=str(cred)).lookup(URL) == ("cred", "6")
    assert CredentialProvider(mode="file", path=str(cred)).lookup(
        "https://reg.example.com:5000/v2/x/blobs/sha256:00") == ("docker", "5")
    assert CredentialProvider(legacy_file=str(cred), docker_config=False).lookup(
        "https://reg.example.com:5000/v2/x/blobs/sha256:00") is None


def test_credentials_lookup_docker_config_in_home(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(
        json.dumps({"auths": {"reg.example.com:5000": {"auth": b64("home:7")}}}))
    assert CredentialProvider(legacy_file="/nonexistent").lookup(URL) == ("home", "7")


# -- credential services -----------------------------------------------------------------------

def service_answer(auths, success=True):
    return json.dumps({"traceId": "t-1", "success": success, "data": {"auths": auths}}).encode()


class Service:
    """Answers every GET with `body` (status `status`) and records the paths."""

    def __init__(self):
        self.body = service_answer({})
        self.status = 200
        self.paths = []
        self.hosts = []

    def handler(self):
        svc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def address_string(self):
                return "local"

            def do_GET(self):
                svc.paths.append(self.path)
                svc.hosts.append(self.headers.get("Host"))
                self.send_response(svc.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(svc.body)))
                self.end_headers()
                self.wfile.write(svc.body)

        return Handler


def serve(server):
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    return t


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_credentials_lookup_http_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))     # no docker config there
    svc = Service()
    server = ThreadingHTTPServer(("127.0.0.1", 0), svc.handler())
    t = serve(server)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/auth"
        p = CredentialProvider(mode="http", path=base, timeout=2)
        svc.body = service_answer({"reg.example.com:5000/team": {"auth": b64("svc:1")}})
        assert p.lookup(URL) == ("svc", "1")
        assert svc.paths[-1] == "/auth?remote_url=" + URL      # raw, not URL-encoded
        svc.body = service_answer({"reg.example.com:5000/team": {"auth": b64("svc:1")}}, False)
        assert p.lookup(URL) is None
        svc.body, svc.status = service_answer({"reg.example.com:5000": {"auth": b64("x:y")}}), 500
        assert p.lookup(URL) is None
        svc.status, svc.body = 200, b"not json"
        assert p.lookup(URL) is None
        # asked again on every lookup: nothing is cached
        svc.body = service_answer({"reg.example.com:5000": {"username": "u2", "password": "p2"}})
        n = len(svc.paths)
        assert p.lookup(URL) == ("u2", "p2") and p.lookup(URL) == ("u2", "p2")
        assert len(svc.paths) == n + 2
    finally:
        stop(server, t)
    assert CredentialProvider(mode="http", path=base, timeout=0.5).lookup(URL) is None   # down


def test_credentials_lookup_uds_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))

    class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    sock = str(tmp_path / "cred.sock")
    svc = Service()
    svc.body = service_answer({"reg.example.com:5000/team/app": {"auth": b64("uds:ok")}})
    server = UnixHTTPServer(sock, svc.handler())
    t = serve(server)
    try:
        p = CredentialProvider(mode="uds", path=sock, timeout=2)
        assert p.lookup(URL) == ("uds", "ok")
        assert svc.paths == ["/auth?remote_url=" + URL]
        assert svc.hosts == ["localhost"]
    finally:
        stop(server, t)
    assert CredentialProvider(mode="uds", path=str(tmp_path / "missing.sock")).lookup(URL) is None


def _self_signed(tmp_path, name, ip=None):
    pytest.importorskip("cryptography")
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                            critical=False)
    cert = b.sign(key, hashes.SHA256())
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_credentials_lookup_https_mode_pins_ca_and_sends_client_cert(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    srv_cert, srv_key = _self_signed(tmp_path, "server", ip="127.0.0.1")
    cli_cert, cli_key = _self_signed(tmp_path, "client")
    other_ca, _ = _self_signed(tmp_path, "other", ip="127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(srv_cert, srv_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cli_cert)
    svc = Service()
    svc.body = service_answer({"reg.example.com:5000": {"auth": b64("tls:yes")}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), svc.handler())
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = serve(server)
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/auth"
        good = dict(mode="https", path=url, timeout=2, server_ca_path=srv_cert,
                    client_cert_path=cli_cert, client_key_path=cli_key)
        assert CredentialProvider(**good).lookup(URL) == ("tls", "yes")
        # a server the pinned CA did not sign, or no client certificate: no credentials
        assert CredentialProvider(**dict(good, server_ca_path=other_ca)).lookup(URL) is None
        assert CredentialProvider(**dict(good, client_cert_path="", client_key_path="")) \
            .lookup(URL) is None
    finally:
        stop(server, t)
