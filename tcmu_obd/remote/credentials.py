"""Registry credentials for a blob URL, found the way overlaybd finds them
(docs/runtime.md, Credentials): a cred.json file, or an http / https / Unix-socket
credential service answering the same JSON, matched with overlaybd's
first-match rule; and, beyond overlaybd, the user's docker config.json when
that gives nothing.

This module only answers "which username and password for this URL".  It does
no registry HTTP, no token exchange and no caching: sources are read again on
every lookup, because the registry client asks only when it must
authenticate (first use, token expiry, a 401).  Docker credential helpers
(`credsStore`, `credHelpers`) and `identitytoken` entries are not supported.
"""
import base64
import binascii
import http.client
import json
import logging
import os
import socket
from urllib.parse import urlsplit

import requests

from tcmu_obd.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("", "file", "http", "https", "uds")
_DOCKER_HUB_HOSTS = ("index.docker.io", "docker.io", "registry-1.docker.io")


def candidate_keys(blob_url):
    """overlaybd's candidate keys for a URL: HOST, HOST/SEG1, ..., HOST/SEG1/.../SEGk.

    The path is `/v2/<repo segments>/blobs/<digest>`; the `v2` segment and the
    `blobs/...` tail (or `manifests/...`) are dropped.  A URL of another shape
    keeps all its non-empty segments after an optional leading `v2`.
    """
    parts = urlsplit(blob_url)
    host = parts.netloc.rpartition("@")[2]
    segs = parts.path.split("/")[1:]
    if segs and segs[0] == "v2":
        segs = segs[1:]
    cut = None
    for i in range(len(segs) - 1, 0, -1):
        if segs[i] in ("blobs", "manifests") and i + 1 < len(segs):
            cut = i
            break
    if cut is not None:
        segs = segs[:cut]
    keys = [host]
    for seg in segs:
        if not seg:
            break
        keys.append(keys[-1] + "/" + seg)
    return keys


def decode_auth(value):
    """`auth` (base64 of user:password) -> (user, password), or None when it is
    not base64 or has no ':' (overlaybd skips such entries).  Padding may be
    missing; the URL-safe alphabet is accepted too."""
    if not isinstance(value, str):
        return None
    text = "".join(value.split())
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            raw = base64.urlsafe_b64decode(text)
        else:
            raw = base64.b64decode(text, validate=True)
        plain = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = plain.partition(":")
    if not sep:
        return None
    return user, password


def _entry_creds(entry):
    if not isinstance(entry, dict):
        return None
    if "auth" in entry:
        return decode_auth(entry["auth"])
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(password, str) and user and password:
        return user, password
    return None


def match_auths(auths, blob_url, normalize=None):
    """First entry, in document order, whose key equals one of the URL's
    candidate keys and which yields credentials; None if there is none.

    `normalize` maps an entry key before comparing (used for docker config)."""
    if not isinstance(auths, dict):
        return None
    keys = set(candidate_keys(blob_url))
    for key, entry in getattr(auths, "pairs", None) or auths.items():
        names = normalize(key) if normalize else (key,)
        if not any(n in keys for n in names):
            continue
        creds = _entry_creds(entry)
        if creds is not None:
            return creds
    return None


def _docker_key(key):
    """A docker config.json `auths` key -> the names it stands for:
    `https://host/v1/` and `http://host` style keys become `host`; Docker Hub's
    index key also stands for registry-1.docker.io, where Hub blobs live."""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    k = k.rstrip("/")
    for tail in ("/v1", "/v2"):
        if k.endswith(tail):
            k = k[: -len(tail)]
    host, slash, rest = k.partition("/")
    if host in _DOCKER_HUB_HOSTS:
        return tuple(h + slash + rest for h in _DOCKER_HUB_HOSTS)
    return (k,)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket (for the uds mode)."""

    def __init__(self, sock_path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.sock_path = sock_path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.sock_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class CredentialProvider:
    """Answers lookup(blob_url) -> (username, password) or None (anonymous).

    Built from the global config: `mode` is credentialConfig.mode ("" means
    the legacy credentialFilePath, `legacy_file`), `path` its file / URL /
    socket path, `timeout` seconds for the http, https and uds services.
    """

    def __init__(self, mode="", path="", timeout=1, client_cert_path="", client_key_path="",
                 server_ca_path="", legacy_file="/opt/overlaybd/cred.json", docker_config=True):
        if mode not in MODES:
            raise ConfigError(f"credentialConfig.mode = {mode!r}: not one of file, http, https, uds")
        if mode and not path:
            raise ConfigError(f"credentialConfig.path is empty with mode {mode!r}")
        self.mode = mode
        self.path = path
        self.timeout = timeout
        self.client_cert_path = client_cert_path
        self.client_key_path = client_key_path
        self.server_ca_path = server_ca_path
        self.legacy_file = legacy_file
        self.docker_config = docker_config

    def lookup(self, blob_url):
        creds = None
        try:
            auths = self._primary_auths(blob_url)
            creds = match_auths(auths, blob_url)
        except (OSError, ValueError, requests.RequestException, http.client.HTTPException) as e:
            log.warning("credentials for %s: %s source failed: %s", blob_url, self.mode or "file", e)
        if creds is None and self.docker_config:
            creds = self._docker_lookup(blob_url)
        return creds

    # -- the configured source ---------------------------------------------------------------

    def _primary_auths(self, blob_url):
        if self.mode in ("", "file"):
            path = self.path if self.mode == "file" else self.legacy_file
            if not path or not os.path.exists(path):
                return None
            return _read_auths_file(path)
        if self.mode == "uds":
            body = self._get_uds(blob_url)
        else:
            body = self._get_http(blob_url)
        return _service_auths(body, self.path)

    def _get_http(self, blob_url):
        sep = "&" if "?" in self.path else "?"
        url = f"{self.path}{sep}remote_url={blob_url}"
        kw = {"timeout": self.timeout}
        if self.mode == "https":
            if self.server_ca_path:
                kw["verify"] = self.server_ca_path
            if self.client_cert_path and self.client_key_path:
                kw["cert"] = (self.client_cert_path, self.client_key_path)
        with requests.get(url, **kw) as resp:
            if resp.status_code != 200:
                raise ValueError(f"GET {url}: HTTP {resp.status_code}")
            return resp.content

    def _get_uds(self, blob_url):
        if not os.path.exists(self.path) or not os.access(self.path, os.W_OK):
            raise OSError(f"credential socket {self.path} is missing or not writable")
        conn = _UnixHTTPConnection(self.path, self.timeout)
        try:
            conn.request("GET", f"/auth?remote_url={blob_url}", headers={"Host": "localhost"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise ValueError(f"GET unix:{self.path}/auth: HTTP {resp.status}")
            return body
        finally:
            conn.close()

    # -- docker config.json fallback -----------------------------------------------------------

    def _docker_lookup(self, blob_url):
        base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
        path = os.path.join(base, "config.json")
        if not os.path.exists(path):
            return None
        try:
            auths = _read_auths_file(path)
        except (OSError, ValueError) as e:
            log.warning("docker config %s unreadable: %s", path, e)
            return None
        return match_auths(auths, blob_url, normalize=_docker_key)


class _Object(dict):
    """A JSON object that also keeps its members in document order, duplicates
    included (overlaybd's RapidJSON walk sees every member)."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


def _loads(data):
    return json.loads(data, object_pairs_hook=_Object)


def _read_auths_file(path):
    with open(path, "rb") as f:
        doc = _loads(f.read())
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: top level is not an object")
    return doc.get("auths")


def _service_auths(body, where):
    doc = _loads(body)
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: answer is not an object")
    if doc.get("success") is False:
        raise ValueError(f"{where}: success = false (traceId {doc.get('traceId')!r})")
    data = doc.get("data")
    return data.get("auths") if isinstance(data, dict) else None
