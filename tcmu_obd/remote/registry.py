"""Registry blob access over HTTP(S), as overlaybd's registryfs v2 does it
(docs/runtime.md, Registry access): the Range-GET challenge, Basic or Bearer-token auth,
the redirect-or-self resolution, sized range reads with bounded retries.
Uploads and manifests (the tools' writes) are tcmu_obd/remote/distribution.py,
on top of RegistryClient.send.

This is not a cache and not a file system: it returns exactly the bytes the
registry sent for a range, checked for status, range and length, but it cannot
tell flipped bytes from good ones (a raw blob has no checksum per range; the
ZFile CRCs above catch that).  Credentials come from a CredentialProvider.

P2P (p2pConfig): with `p2p_address` set, every data GET (range reads and the
size probe) goes to `<p2p_address>/<resolved blob URL>`, the form overlaybd
and dadi-p2proxy use, with the same Range and Authorization headers; the
challenge, token and redirect resolution still talk to the registry itself.
A proxy that fails 1 + `retries` times in a row for one request is logged and
the request goes to the registry directly; the proxy is then skipped for
`p2p_recheck` seconds (so a dead proxy costs one warning, not a stall per read).

Differences from overlaybd, on purpose: a read retries for at most
`read_deadline` seconds (overlaybd retries for days); a cached token is
dropped when its `expires_in` runs out or the registry answers 401/403; a 200
answer to a partial range is sliced to the asked range instead of being taken
as the start of the blob.
"""
import base64
import http.client
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from tcmu_obd import __version__, stats
from tcmu_obd.errors import (AuthError, BlobNotFound, ConnectionFailed, RemoteError, RemoteTimeout,
                             TooManyRequests, UnexpectedResponse, UsageError)

log = logging.getLogger(__name__)

RESOLVE_TTL = 300.0          # seconds a URL's resolution is trusted (overlaybd: >= 300 s)
DEFAULT_TOKEN_TTL = 60.0     # token lifetime when the token service gives no expires_in
MAX_TOKEN_BODY = 1 << 20
_DRAIN_LIMIT = 64 << 10      # bodies up to this size are read so the connection is reused
_BODY_CHUNK = 1 << 20        # body read size: 64 KiB costs 1.6x the CPU per MiB
_MIN_ATTEMPT = 0.02          # no retry is started with less time than this left

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.I)
_TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError,
                     http.client.HTTPException, OSError)


@dataclass
class RegistrySettings:
    """How the client talks to registries.

    timeout: seconds for one HTTP request (connect, each socket read, and the
    whole body).  retries: extra attempts for open/size after a transient
    failure (a permanent status such as 400/401/404 is not retried).  backoff / max_backoff:
    the sleep before retry n is min(max_backoff, backoff * 2**n).
    read_deadline: total seconds one read (or open) may keep retrying before it
    raises RemoteTimeout; 0 means retry transient failures forever.
    cert_file / key_file: TLS client certificate (certConfig).  ca_bundle: CA
    file to trust instead of requests' default.  verify: check server certs.
    p2p_address: the P2P proxy's address (p2pConfig.address when enabled), ""
    for none; one without a scheme is taken as http://.  p2p_recheck: seconds
    the proxy is skipped after it failed a request (see the module docstring).
    """
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.01
    max_backoff: float = 1.0
    read_deadline: float = 60.0
    user_agent: str = f"tcmu-obd/{__version__}"
    cert_file: str = ""
    key_file: str = ""
    ca_bundle: str = ""
    verify: bool = True
    p2p_address: str = ""
    p2p_recheck: float = 30.0

    def delay(self, attempt):
        return min(self.max_backoff, self.backoff * (2 ** min(attempt, 30)))


def blob_url(repo_blob_url, digest):
    """overlaybd's blob URL: repoBlobUrl + ("/" unless it ends with "/") + digest."""
    return repo_blob_url + ("" if repo_blob_url.endswith("/") else "/") + digest


def p2p_url(address, url):
    """The URL a P2P proxy at `address` serves `url` under: the two joined by
    one '/' (a trailing '/' of address is dropped; no scheme means http://)."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    return address + "/" + url


def parse_challenge(header):
    """A WWW-Authenticate value -> ("basic", {}) or ("bearer", params), or None
    for a scheme we do not speak.  Bearer parameters are parsed as overlaybd
    does: every '",' becomes '";', split on ';', k=v with quotes trimmed."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        return "basic", {}
    if scheme != "bearer":
        return None
    params = {}
    for item in rest.replace('",', '";').split(";"):
        key, eq, value = item.strip().partition("=")
        if eq:
            params[key.strip().lower()] = value.strip().strip('"')
    return "bearer", params


def parse_content_range(value):
    """'bytes a-b/N' -> (a, b, N); 'bytes */N' -> (None, None, N); N may be None
    for '*'.  Anything else -> None."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None
    a, b, n = m.groups()
    total = None if n == "*" else int(n)
    if a is None:
        return None, None, total
    return int(a), int(b), total


def _status_error(url, status, cause=""):
    if status in (401, 403):
        return AuthError(url, status, cause)
    if status == 404:
        return BlobNotFound(url, status, cause)
    if status == 429:
        return TooManyRequests(url, status, cause)
    return UnexpectedResponse(url, status, cause)


def _permanent(e):
    """A RemoteError no retry can change: a 3xx or 4xx answer (not 408 or 429).
    Transient: connection failures, timeouts, 408, 429, 5xx, and a 2xx answer
    whose headers or body broke the protocol (a middlebox's glitch)."""
    if isinstance(e, (RemoteTimeout, ConnectionFailed, TooManyRequests)) or e.status is None:
        return False
    return 300 <= e.status < 500 and e.status not in (408, 429)


def _basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _no_auth(request):
    """Session-wide auth that adds nothing: stops requests from reading ~/.netrc."""
    return request


def _origin(url):
    p = urlsplit(url)
    return p.scheme.lower(), p.netloc.lower()


def _close(resp, drain=True):
    """Finish with a streamed response.  drain (only for a body nobody has
    started reading): read a small body so the keep-alive connection goes
    back to the pool.  A body read to its end is released by close(); a
    partly read one drops its connection."""
    try:
        n = resp.headers.get("Content-Length")
        if drain and resp.status_code != 416 and n is not None and n.isdigit() \
                and int(n) <= _DRAIN_LIMIT:
            resp.content  # noqa: B018 -- reads and releases
    except _TRANSPORT_ERRORS:
        pass
    resp.close()


class _Resolution:
    """Where a blob URL's data is fetched from, and with what Authorization."""
    __slots__ = ("actual_url", "authorization", "redirect", "expires", "token_key", "size")

    def __init__(self, actual_url, authorization, redirect, expires, token_key, size=None):
        self.actual_url = actual_url
        self.authorization = authorization
        self.redirect = redirect
        self.expires = expires
        self.token_key = token_key
        self.size = size


class RegistryClient:
    """Blob reads, uploads and manifests against OCI registries.

    Safe to share between threads: each thread gets its own keep-alive
    requests.Session; the token and resolution caches are under a lock.
    `credentials` is anything with lookup(url) -> (user, password) or None.
    """

    def __init__(self, settings=None, credentials=None):
        self.settings = settings or RegistrySettings()
        self.credentials = credentials
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions = []
        self._tokens = {}     # (realm, service, scope) -> (token, expires)
        self._resolved = {}   # url -> _Resolution
        self._proxies = {}    # (scheme, host:port) -> proxies from the environment
        self._p2p_skip_until = 0.0   # monotonic time before which the P2P proxy is not tried

    # -- plumbing ------------------------------------------------------------------------------

    def session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            st = self.settings
            s = requests.Session()
            s.headers["User-Agent"] = st.user_agent
            s.auth = _no_auth
            if st.cert_file:
                s.cert = (st.cert_file, st.key_file) if st.key_file else st.cert_file
            s.verify = (st.ca_bundle or True) if st.verify else False
            # the environment is read once, not on every request (requests spends ~0.3 ms
            # walking os.environ twice per request): proxies per origin in _request, and the
            # CA bundle variables as requests reads them
            s.trust_env = False
            if s.verify is True:
                s.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
            with self._lock:
                self._sessions.append(s)
            self._local.session = s
        return s

    def _env_proxies(self, url):
        """HTTP(S)_PROXY / NO_PROXY for url's origin, as requests reads them (once per origin)."""
        key = _origin(url)
        proxies = self._proxies.get(key)
        if proxies is None:
            proxies = self._proxies[key] = requests.utils.get_environ_proxies(url)
        return proxies

    def close(self):
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method, url, headers=None, data=None, timeout=None,
                 allow_redirects=False, stream=True):
        t = self.settings.timeout if timeout is None else timeout
        try:
            return self.session().request(method, url, headers=headers, data=data, timeout=t,
                                          allow_redirects=allow_redirects, stream=stream,
                                          proxies=self._env_proxies(url))
        except requests.Timeout as e:
            raise RemoteTimeout(url, cause=f"{method} timed out after {t:.3g} s ({e})") from e
        except _TRANSPORT_ERRORS as e:
            raise ConnectionFailed(url, cause=f"{method}: {e}") from e

    def _credentials(self, url):
        if self.credentials is None:
            return None
        return self.credentials.lookup(url)

    # -- auth ----------------------------------------------------------------------------------

    def _authorization(self, url, www_authenticate, status, force_new=False):
        """A challenge -> (Authorization value, expiry, token cache key)."""
        parsed = parse_challenge(www_authenticate)
        if parsed is None:
            raise AuthError(url, status, f"unsupported challenge {www_authenticate!r}")
        kind, params = parsed
        creds = self._credentials(url)
        if kind == "basic":
            if not creds:
                raise AuthError(url, status, "Basic auth asked for and no credentials found")
            return _basic(*creds), math.inf, None
        missing = [k for k in ("realm", "service", "scope") if not params.get(k)]
        if missing:
            raise AuthError(url, status, f"Bearer challenge lacks {', '.join(missing)}: "
                                         f"{www_authenticate!r}")
        key = (params["realm"], params["service"], params["scope"])
        token, expires = self._token(url, key, creds, force_new)
        return "Bearer " + token, expires, key

    def _token(self, url, key, creds, force_new):
        now = time.monotonic()
        if not force_new:
            with self._lock:
                hit = self._tokens.get(key)
            if hit and hit[1] > now:
                return hit
        realm, service, scope = key
        token_url = f"{realm}{'&' if '?' in realm else '?'}service={service}&scope={scope}"
        headers = {"Authorization": _basic(*creds)} if creds else {}
        resp = self._request("GET", token_url, headers=headers, allow_redirects=True)
        try:
            status = resp.status_code
            if status != 200:
                # overlaybd reports any failed token step as an auth failure; rate limits and
                # server errors stay what they are, so reads retry them
                why = f"token service {token_url} answered HTTP {status}"
                if status == 429 or status >= 500:
                    raise _status_error(url, status, why)
                raise AuthError(url, status, why)
            body = resp.raw.read(MAX_TOKEN_BODY + 1, decode_content=True)
        except _TRANSPORT_ERRORS as e:
            raise ConnectionFailed(url, cause=f"token service {token_url}: {e}") from e
        finally:
            resp.close()
        try:
            doc = json.loads(body[:MAX_TOKEN_BODY])
            token = doc.get("token") or doc.get("access_token")
            ttl = doc.get("expires_in")
        except (ValueError, AttributeError):
            token, ttl = None, None
        if not isinstance(token, str) or not token:
            raise AuthError(url, 401, f"token service {token_url} answered no token")
        if not isinstance(ttl, (int, float)) or ttl <= 0:
            ttl = DEFAULT_TOKEN_TTL
        expires = time.monotonic() + ttl - min(5.0, ttl / 4)
        with self._lock:
            self._tokens[key] = (token, expires)
        return token, expires

    def _drop_token(self, key):
        if key is not None:
            with self._lock:
                self._tokens.pop(key, None)

    # -- resolution (challenge, token, redirect-or-self) ---------------------------------------

    def resolve(self, url):
        """The cached resolution of a blob URL, made if missing or stale."""
        now = time.monotonic()
        with self._lock:
            r = self._resolved.get(url)
        if r is not None and r.expires > now:
            return r
        r = self._do_resolve(url)
        with self._lock:
            self._resolved[url] = r
        return r

    def invalidate(self, url, error=None):
        """Forget url's resolution (a data request failed); on an auth failure
        also forget the token it used."""
        with self._lock:
            r = self._resolved.pop(url, None)
        if r is not None and isinstance(error, AuthError):
            self._drop_token(r.token_key)

    def _do_resolve(self, url):
        probe = {"Range": "bytes=0-0", "Accept-Encoding": "identity"}
        resp = self._request("GET", url, headers=probe)
        _close(resp)
        authz, expires, key = None, math.inf, None
        if resp.status_code in (401, 403):
            www = resp.headers.get("WWW-Authenticate")
            for fresh in (False, True):
                authz, expires, key = self._authorization(url, www, resp.status_code, force_new=fresh)
                resp = self._request("GET", url, headers=dict(probe, Authorization=authz))
                _close(resp)
                if resp.status_code not in (401, 403) or key is None:
                    break
                self._drop_token(key)   # a cached token the registry no longer takes
        status = resp.status_code
        expires = min(expires, time.monotonic() + RESOLVE_TTL)
        if 300 <= status < 400:
            loc = resp.headers.get("Location")
            if not loc:
                raise UnexpectedResponse(url, status, "redirect without Location")
            return _Resolution(urljoin(url, loc), None, True, expires, key)
        if status in (200, 206) or (status == 416 and _size_from(resp) is not None):
            # 416 "bytes */N": an empty blob answers the 1-byte probe so
            return _Resolution(url, authz, False, expires, key, _size_from(resp))
        if status in (401, 403):
            self._drop_token(key)
        raise _status_error(url, status, "resolving the blob")

    # -- blobs ---------------------------------------------------------------------------------

    def open_blob(self, url):
        """Resolve url and learn its size; raises AuthError, BlobNotFound, ... now."""
        blob = RemoteBlob(self, url)
        blob.size  # noqa: B018 -- open/stat as overlaybd does
        return blob

    def _retry(self, url, op, meta):
        """Run op(deadline) until it succeeds.  A permanent status (see
        _permanent) fails at once, except that an auth error on a resolution
        cached before this call earns one fresh resolution (its token or
        redirect may have expired).  Transient failures are tried 1 + retries
        times for meta operations, and until the read deadline for reads.
        Past the deadline: RemoteTimeout."""
        st = self.settings
        start = time.monotonic()
        deadline = start + st.read_deadline if st.read_deadline > 0 else math.inf
        with self._lock:
            r = self._resolved.get(url)
        may_reauth = r is not None and r.expires > start
        attempt = 0
        last = None
        while True:
            try:
                return op(deadline)
            except RemoteError as e:
                # an attempt cut short by the deadline itself says less than the one before it
                if not (isinstance(e, RemoteTimeout) and last is not None
                        and time.monotonic() >= deadline - _MIN_ATTEMPT):
                    last = e
                self.invalidate(url, e)
                if _permanent(e):
                    if isinstance(e, AuthError) and may_reauth:
                        may_reauth = False
                        log.debug("re-authenticating %s after: %s", url, e)
                        continue
                    stats.registry_error(url)
                    raise
                if meta and attempt >= st.retries:
                    stats.registry_error(url)
                    raise
            delay = st.delay(attempt)
            attempt += 1
            log.debug("retry %d of %s in %.3f s after: %s", attempt, url, delay, last)
            if time.monotonic() + delay + _MIN_ATTEMPT >= deadline:
                stats.registry_error(url)
                raise RemoteTimeout(url, last.status, f"gave up after {attempt} attempts in "
                                    f"{time.monotonic() - start:.2f} s; last error: {last}") from last
            stats.registry_retry(url)
            time.sleep(delay)

    def _blob_size(self, url):
        def take(resp):
            try:
                if resp.status_code == 416 and _size_from(resp) == 0:
                    return 0
                if resp.status_code not in (200, 206):
                    raise _status_error(url, resp.status_code, "size probe")
                size = _size_from(resp)
                if size is None:
                    raise UnexpectedResponse(url, resp.status_code, "no blob size in the answer")
                return size
            finally:
                _close(resp)

        def op(deadline):
            res = self.resolve(url)
            if res.size is not None:
                return res.size
            return self._fetch(url, res, 0, 1, deadline, take)
        return self._retry(url, op, meta=True)

    def _range_headers(self, res, offset, length):
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        if res.authorization and not res.redirect:
            headers["Authorization"] = res.authorization
        return headers

    def _data_get(self, url, res, offset, length, deadline):
        timeout = min(self.settings.timeout, max(0.001, deadline - time.monotonic()))
        return self._request("GET", res.actual_url, headers=self._range_headers(res, offset, length),
                             timeout=timeout, allow_redirects=res.redirect)

    def _fetch(self, url, res, offset, length, deadline, take):
        """take(response) for a data GET of bytes offset+length: through the
        P2P proxy when one is set and not being skipped, else (or after the
        proxy failed 1 + retries times) from the registry.  take checks and
        closes the response; its RemoteError is a failure of that source."""
        st = self.settings
        if st.p2p_address and time.monotonic() >= self._p2p_skip_until:
            last = None
            for attempt in range(st.retries + 1):
                if attempt:
                    delay = st.delay(attempt - 1)
                    if time.monotonic() + delay + _MIN_ATTEMPT >= deadline:
                        break
                    time.sleep(delay)
                    if isinstance(last, AuthError):
                        # the registry behind the proxy refused the credentials: re-authenticate
                        self.invalidate(url, last)
                        res = self.resolve(url)
                via = p2p_url(st.p2p_address, res.actual_url)
                timeout = min(st.timeout, max(0.001, deadline - time.monotonic()))
                try:
                    # the proxy may send an agent on to another node with a redirect
                    resp = self._request("GET", via, headers=self._range_headers(res, offset, length),
                                         timeout=timeout, allow_redirects=True)
                    return take(resp)
                except RemoteError as e:
                    last = e
                    log.debug("p2p proxy attempt %d for %s failed: %s", attempt + 1, via, e)
            with self._lock:
                first = time.monotonic() >= self._p2p_skip_until
                self._p2p_skip_until = time.monotonic() + st.p2p_recheck
            (log.warning if first else log.info)(
                "p2p proxy %s failed for bytes %d+%d of %s (last error: %s); reading from the "
                "registry directly, and skipping the proxy for %.0f s",
                st.p2p_address, offset, length, url, last, st.p2p_recheck)
        return take(self._data_get(url, res, offset, length, deadline))

    def _read(self, blob, offset, length):
        url = blob.url

        def op(deadline):
            def take(resp):
                until = min(deadline, time.monotonic() + self.settings.timeout)
                drain = True
                try:
                    status = resp.status_code
                    drain = status not in (200, 206)
                    if status == 206:
                        cr = parse_content_range(resp.headers.get("Content-Range"))
                        end = offset + length - 1
                        if not cr or cr[0] is None or cr[0] > offset or cr[1] < end:
                            raise UnexpectedResponse(url, status, f"Content-Range "
                                                     f"{resp.headers.get('Content-Range')!r} does not "
                                                     f"cover bytes {offset}-{end}")
                        exact = cr[0] == offset and cr[1] == end
                        return _read_body(url, resp, offset - cr[0], length, until, exact)
                    if status == 200:
                        n = resp.headers.get("Content-Length")
                        if n is not None and n.isdigit() and int(n) != blob.size:
                            raise UnexpectedResponse(url, status, f"a 200 answer of {n} bytes to a "
                                                     f"range request on a {blob.size}-byte blob")
                        return _read_body(url, resp, offset, length, until,
                                          exact=offset == 0 and length == blob.size)
                    raise _status_error(url, status, f"reading bytes {offset}+{length}")
                finally:
                    _close(resp, drain)

            stats.registry_request(url)
            return self._fetch(url, self.resolve(url), offset, length, deadline, take)
        t0 = time.monotonic_ns()
        data = self._retry(url, op, meta=False)
        stats.registry_read(url, len(data), time.monotonic_ns() - t0)
        return data

    # -- generic authenticated requests (uploads, manifests) -----------------------------------

    def send(self, method, url, *, headers=None, data=None, expect=(200,), authorization=None,
             cred_url=None, allow_redirects=False):
        """One request with the challenge flow: on 401/403 get an Authorization
        from the answer's WWW-Authenticate (a fresh token after the first time)
        and send again, up to 3 times.  Returns (response, authorization); the
        body is read.  Authorization is sent only to cred_url's origin."""
        cred_url = cred_url or url
        for refresh in range(4):
            h = dict(headers or {})
            if authorization and _origin(url) == _origin(cred_url):
                h["Authorization"] = authorization
            resp = self._request(method, url, headers=h, data=data, stream=False,
                                 allow_redirects=allow_redirects)
            if resp.status_code in (401, 403) and refresh < 3:
                authorization, _, _ = self._authorization(
                    cred_url, resp.headers.get("WWW-Authenticate"), resp.status_code,
                    force_new=authorization is not None)
                continue
            if resp.status_code not in expect:
                raise _status_error(url, resp.status_code,
                                    f"{method}: {resp.text[:200].strip()!r}")
            return resp, authorization
        raise AssertionError("unreachable")


class RemoteBlob:
    """One registry blob: its URL, size, and checked range reads."""

    def __init__(self, client, url):
        self.client = client
        self.url = url
        self._size = None

    @property
    def size(self):
        if self._size is None:
            self._size = self.client._blob_size(self.url)
        return self._size

    def read(self, offset, length):
        """Bytes [offset, offset+length) clipped to the blob; b"" past the end.
        Exactly those bytes or a RemoteError subclass, within read_deadline."""
        if offset < 0 or length < 0:
            raise UsageError(f"read({offset}, {length}) on {self.url}: negative offset or length")
        size = self.size
        if length == 0 or offset >= size:
            return b""
        return self.client._read(self, offset, min(length, size - offset))

    def __repr__(self):
        return f"RemoteBlob({self.url!r}, size={self._size})"


def _size_from(resp):
    """Blob size from a 1-byte probe: 206 "bytes 0-0/N", 200 Content-Length,
    or 416 "bytes */N"."""
    if resp.status_code in (206, 416):
        cr = parse_content_range(resp.headers.get("Content-Range"))
        if resp.status_code == 416 and cr and cr[0] is not None:
            return None
        return cr[2] if cr else None
    if resp.status_code == 200:
        n = resp.headers.get("Content-Length")
        return int(n) if n is not None and n.isdigit() else None
    return None


def _is_timeout(e):
    """requests reports a timeout while streaming a body as a ConnectionError
    wrapping urllib3's ReadTimeoutError."""
    return isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)) or \
        any(isinstance(a, urllib3.exceptions.TimeoutError) for a in getattr(e, "args", ()))


def _read_body(url, resp, skip, length, until, exact):
    """Bytes [skip, skip+length) of a streamed body.  exact: the body must be
    exactly those bytes (read to its end, so the connection is reused).  The
    chunks are joined once at the end (one copy of the body, not three)."""
    parts = []
    got = seen = 0
    try:
        for chunk in resp.iter_content(_BODY_CHUNK):
            if time.monotonic() > until:
                raise RemoteTimeout(url, resp.status_code, f"body of {length} bytes not read "
                                    f"in time ({got} so far)")
            if seen < skip:
                cut = min(len(chunk), skip - seen)
                seen += cut
                chunk = chunk[cut:]
            if chunk:
                parts.append(chunk)
                got += len(chunk)
            if exact and got > length:
                raise UnexpectedResponse(url, resp.status_code,
                                         f"body longer than the {length} bytes asked for")
            if not exact and got >= length:
                break
    except _TRANSPORT_ERRORS as e:
        if _is_timeout(e):
            raise RemoteTimeout(url, resp.status_code, f"body read timed out after "
                                f"{got} of {length} bytes: {e}") from e
        raise ConnectionFailed(url, resp.status_code, f"body cut short after "
                               f"{got} of {length} bytes: {e}") from e
    if got < length:
        raise ConnectionFailed(url, resp.status_code,
                               f"body truncated: {got} of {length} bytes")
    data = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
    return data if len(data) == length else data[:length]
