"""The distribution API calls the image tools make on top of
RegistryClient.send: chunked blob upload (POST, PATCH per chunk with
Content-Range, PUT ?digest=; DELETE on failure) and manifest push / get
(docs/runtime.md, Registry uploads; the OCI distribution spec).  Not blob range reads
(registry.py) nor whole-blob transfers with progress (blobs.py).
"""
import hashlib
import logging
from collections import namedtuple
from urllib.parse import urljoin

from tcmu_obd.errors import RemoteError, UnexpectedResponse, UsageError

log = logging.getLogger(__name__)

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


# -- uploads -----------------------------------------------------------------------------------

class BlobUploader:
    """A writable stream that pushes a blob: POST <.../blobs/uploads/>, then one
    PATCH per chunk_size bytes (Content-Range a-b), then PUT ?digest= on
    close(), which returns "sha256:<hex>".  Leaving a `with` block by an
    exception cancels the upload (DELETE)."""

    def __init__(self, client, upload_url, chunk_size=4 << 20):
        if chunk_size <= 0:
            raise UsageError(f"upload chunk size {chunk_size} must be positive")
        self.client = client
        self.upload_url = upload_url
        self.chunk_size = chunk_size
        self.digest = None
        self._buf = bytearray()
        self._offset = 0
        self._sha = hashlib.sha256()
        self._auth = None
        resp = self._send("POST", upload_url, expect=(202,))
        self._location = self._next(resp)

    @property
    def bytes_written(self):
        return self._offset + len(self._buf)

    def _send(self, method, url, **kw):
        resp, self._auth = self.client.send(method, url, authorization=self._auth,
                                            cred_url=self.upload_url, **kw)
        return resp

    def _next(self, resp):
        loc = resp.headers.get("Location")
        if not loc:
            raise UnexpectedResponse(resp.url, resp.status_code, "upload answer without Location")
        return urljoin(resp.url, loc)

    def write(self, data):
        if self.digest is not None:
            raise UsageError(f"write to the closed upload {self.upload_url}")
        self._sha.update(data)
        self._buf += data
        if len(self._buf) >= self.chunk_size:
            view = memoryview(self._buf)
            pos = 0
            while len(self._buf) - pos >= self.chunk_size:
                self._patch(bytes(view[pos:pos + self.chunk_size]))
                pos += self.chunk_size
            view.release()
            del self._buf[:pos]
        return len(data)

    def _patch(self, chunk):
        headers = {"Content-Range": f"{self._offset}-{self._offset + len(chunk) - 1}",
                   "Content-Type": "application/octet-stream"}
        resp = self._send("PATCH", self._location, headers=headers, data=chunk, expect=(202,))
        self._location = self._next(resp)
        self._offset += len(chunk)

    def close(self):
        """Send what is buffered, commit with PUT ?digest=, return the digest."""
        if self.digest is not None:
            return self.digest
        if self._buf:
            self._patch(bytes(self._buf))
            self._buf.clear()
        digest = "sha256:" + self._sha.hexdigest()
        sep = "&" if "?" in self._location else "?"
        resp = self._send("PUT", f"{self._location}{sep}digest={digest}", data=b"",
                          headers={"Content-Type": "application/octet-stream"}, expect=(201,))
        said = resp.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise UnexpectedResponse(self.upload_url, resp.status_code,
                                     f"registry stored {said}, we sent {digest}")
        self.digest = digest
        return digest

    def abort(self):
        """Cancel the upload (best effort)."""
        if self.digest is None:
            self.digest = ""
            try:
                self.client.send("DELETE", self._location, authorization=self._auth,
                                 cred_url=self.upload_url, expect=(200, 202, 204, 404))
            except RemoteError as e:
                log.debug("cancelling upload %s: %s", self._location, e)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def upload_blob(client, upload_url, chunks_iterable, chunk_size=4 << 20):
    """Push the bytes of chunks_iterable as one blob; returns "sha256:<hex>"."""
    with BlobUploader(client, upload_url, chunk_size) as up:
        for chunk in chunks_iterable:
            up.write(chunk)
        return up.close()


# -- manifests ---------------------------------------------------------------------------------

Manifest = namedtuple("Manifest", "content media_type digest")


def _repo_base(repo_url):
    base = repo_url.rstrip("/")
    return base[: -len("/blobs")] if base.endswith("/blobs") else base


def push_manifest(client, repo_url, tag, manifest_bytes, media_type):
    """PUT <repo_url>/manifests/<tag>; repo_url is .../v2/<repo> (a repoBlobUrl
    ending in /blobs is accepted too).  Returns the manifest digest."""
    url = f"{_repo_base(repo_url)}/manifests/{tag}"
    resp, _ = client.send("PUT", url, data=bytes(manifest_bytes),
                          headers={"Content-Type": media_type}, expect=(201,))
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    said = resp.headers.get("Docker-Content-Digest")
    if said and said != digest:
        raise UnexpectedResponse(url, resp.status_code, f"registry says {said}, we sent {digest}")
    return digest


def get_manifest(client, ref_url, accept=MANIFEST_TYPES):
    """GET .../v2/<repo>/manifests/<tag or digest> -> Manifest(content,
    media_type, digest).  `accept` must list every type wanted: registries
    answer 404 for an OCI manifest the Accept header does not name.  A
    digest reference is checked against the bytes."""
    resp, _ = client.send("GET", ref_url, headers={"Accept": ", ".join(accept)},
                          allow_redirects=True)
    content = resp.content
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    ref = ref_url.rstrip("/").rsplit("/", 1)[-1]
    if ref.startswith("sha256:") and ref != digest:
        raise UnexpectedResponse(ref_url, resp.status_code, f"content hashes to {digest}")
    media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
    return Manifest(content, media_type, digest)
