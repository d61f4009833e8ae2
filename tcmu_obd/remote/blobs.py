"""Moving whole blobs between a registry and the image tools: exists,
cross-repository mount, upload of a file or bytes, download to a file, and
BlobStream (a blob as a sequential stream, fetched ahead on a thread, its
digest checked at the end) that conversion feeds to overlaybd-apply.
Progress bars (tcmu_obd.build.progress.Bar, or anything with its counting
methods) are optional on each.  Not the HTTP client (registry.py) nor lazy
range reads of layers (context.py, cache.py).
"""
import hashlib
import logging
import os
import queue
import threading
import time
from urllib.parse import urljoin

from tcmu_obd.remote import distribution, registry
from tcmu_obd.errors import RemoteError

log = logging.getLogger(__name__)

MiB = 1 << 20
FETCH_CHUNK = 8 * MiB
UPLOAD_CHUNK = 16 * MiB


class _NoBar:
    """Counts nothing: the bar of a call that was given none (the build
    tools pass a tcmu_obd.build.progress.Bar; this room does not import it)."""

    def set_total(self, total):
        pass

    def update(self, n):
        pass

    def set(self, done):
        pass

    def skip(self, reason):
        pass

    def close(self, note=None):
        pass


def null_bar():
    return _NoBar()


class BlobError(RemoteError):
    """A blob's bytes or size are not what its digest or manifest says."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                break
            h.update(b)
    return "sha256:" + h.hexdigest()


def blob_exists(client, repo, digest):
    resp, _ = client.send("HEAD", registry.blob_url(repo.repo_blob_url, digest), expect=(200, 404),
                          allow_redirects=True)
    return resp.status_code == 200


def mount_blob(client, repo, digest, from_repo):
    """Cross-repository blob mount; True if the registry mounted it."""
    url = f"{repo.base}/blobs/uploads/?mount={digest}&from={from_repo}"
    try:
        resp, auth = client.send("POST", url, expect=(201, 202))
    except RemoteError as e:
        log.debug("mount of %s from %s: %s", digest, from_repo, e)
        return False
    if resp.status_code == 201:
        return True
    loc = resp.headers.get("Location")      # 202: an upload session was opened instead
    if loc:
        try:
            client.send("DELETE", urljoin(resp.url, loc), authorization=auth,
                        cred_url=url, expect=(200, 202, 204, 404))
        except RemoteError:
            pass
    return False


def upload_file(client, repo, path, digest=None, bar=None):
    """Upload a file as a blob unless the repository has it; returns
    (digest, uploaded?).  `bar` (a progress.Bar) counts the bytes sent; it
    is closed (or skipped when the registry has the blob) here."""
    digest = digest or sha256_file(path)
    bar = bar or null_bar()
    if blob_exists(client, repo, digest):
        bar.skip("already in the registry")
        return digest, False
    size = os.path.getsize(path)
    bar.set_total(size)

    def chunks(f):
        while True:
            b = f.read(UPLOAD_CHUNK)
            if not b:
                return
            yield b
            # back here, the uploader has PATCHed a whole chunk; a short last
            # one is only sent by its close(), so it is counted after that
            if len(b) == UPLOAD_CHUNK:
                bar.update(len(b))

    with open(path, "rb") as f:
        got = distribution.upload_blob(client, repo.base + "/blobs/uploads/", chunks(f), UPLOAD_CHUNK)
    if got != digest:
        raise BlobError(f"{path}: uploaded {got}, expected {digest} (changed while uploading?)")
    bar.set(size)
    bar.close()
    return digest, True


def upload_bytes(client, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not blob_exists(client, repo, digest):
        distribution.upload_blob(client, repo.base + "/blobs/uploads/", [data])
    return digest


def fetch_blob_bytes(client, repo, digest, limit=64 * MiB):
    blob = client.open_blob(registry.blob_url(repo.repo_blob_url, digest))
    if blob.size > limit:
        raise BlobError(f"{repo}: blob {digest} is {blob.size} bytes, more than {limit}")
    data = blob.read(0, blob.size) if blob.size else b""
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise BlobError(f"{repo}: blob {digest} hashes to {got}")
    return data


def download_blob(client, repo, digest, path, bar=None):
    """Download a blob to path, verifying its digest; returns its size.
    `bar` counts the bytes received and is closed when they all are."""
    stream = BlobStream(client, repo, digest, fetch_bar=bar)
    try:
        with open(path, "wb") as f:
            for chunk in stream.chunks():
                f.write(chunk)
    finally:
        stream.close()
    return os.path.getsize(path)


class BlobStream:
    """A registry blob as a sequential read()-able stream: range GETs of
    FETCH_CHUNK bytes fetched ahead by a thread, the digest checked at the
    end (a mismatch raises BlobError from read()).  Progress bars, both
    optional: `fetch_bar` counts bytes received from the registry (updated
    and closed by the fetch thread), `read_bar` bytes handed to the reader
    (updated only: the reader's caller closes it)."""

    def __init__(self, client, repo, digest, expected_size=None, ahead=4, fetch_bar=None,
                 read_bar=None):
        self.url = registry.blob_url(repo.repo_blob_url, digest)
        self.digest = digest
        self.blob = client.open_blob(self.url)
        self.size = self.blob.size
        if expected_size is not None and expected_size != self.size:
            raise BlobError(f"{self.url}: the manifest says {expected_size} bytes, the registry "
                               f"has {self.size}")
        self.sha = hashlib.sha256()
        self.fetch_bar, self.read_bar = fetch_bar or null_bar(), read_bar or null_bar()
        self.fetch_bar.set_total(self.size)
        self.read_bar.set_total(self.size)
        self.q = queue.Queue(ahead)
        self.stop = threading.Event()
        self.buf = b""
        self.done = False
        self.thread = threading.Thread(target=self._fetch, name="blob-fetch", daemon=True)
        self.thread.start()
        self.seconds = 0.0

    def _fetch(self):
        t0 = time.monotonic()
        try:
            off = 0
            while off < self.size and not self.stop.is_set():
                data = self.blob.read(off, min(FETCH_CHUNK, self.size - off))
                if not data:
                    raise BlobError(f"{self.url}: empty read at {off}")
                off += len(data)
                self.fetch_bar.update(len(data))
                self._put(data)
            self.seconds = time.monotonic() - t0
            if not self.stop.is_set():
                self.fetch_bar.close()
            self._put(None)
        except BaseException as e:   # noqa: BLE001 -- handed to the reader
            self._put(e)

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _next(self):
        if self.done:
            return b""
        item = self.q.get()
        if item is None:
            self.done = True
            got = "sha256:" + self.sha.hexdigest()
            if got != self.digest:
                raise BlobError(f"{self.url}: the blob hashes to {got}")
            return b""
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.sha.update(item)
        return item

    def chunks(self):
        while True:
            c = self._next()
            if not c:
                return
            self.read_bar.update(len(c))
            yield c

    def read(self, n=-1):
        if n is None or n < 0:
            out = b"".join([self.buf] + [c for c in iter(self._next, b"")])
            self.buf = b""
        else:
            while len(self.buf) < n:
                c = self._next()
                if not c:
                    break
                self.buf = self.buf + c if self.buf else c
            out, self.buf = self.buf[:n], self.buf[n:]
        # counted as the reader takes bytes, not as chunks arrive: a layer
        # smaller than FETCH_CHUNK would otherwise read as done at once
        self.read_bar.update(len(out))
        return out

    def close(self):
        self.stop.set()
        self.thread.join(5)
