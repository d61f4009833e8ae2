"""Registry access against a real docker-registry on 127.0.0.1: anonymous,
htpasswd Basic and token (Bearer) auth; sizes and range reads checked byte
for byte; token caching and re-authentication; auth and not-found errors;
blob upload (upload_blob, BlobUploader) and manifest push / get.

Faults (drops, stalls, bad answers) are in test_registry_faults.py.
"""
import hashlib
import json
import random
import threading
import time

import pytest

from registry_server import Registry, require

from tcmu_obd import __version__
from tcmu_obd.remote.credentials import CredentialProvider
from tcmu_obd.errors import AuthError, BlobNotFound, UnexpectedResponse
from tcmu_obd.remote.distribution import MANIFEST_TYPES, BlobUploader, get_manifest, push_manifest, upload_blob
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings, blob_url

require("docker-registry")

USERS = {"alice": "s3cret"}
REPO = "lib/app"
BLOB = random.Random(1234).randbytes(5 * (1 << 20) + 12345)   # not a multiple of anything
MISSING = "sha256:" + "0" * 64


class Creds:
    def __init__(self, user=None, password=None):
        self.value = (user, password) if user else None
        self.calls = 0

    def lookup(self, url):
        self.calls += 1
        return self.value


@pytest.fixture(scope="module", params=["anonymous", "basic", "token"])
def reg(request):
    mode = None if request.param == "anonymous" else request.param
    with Registry(mode, users=USERS) as r:
        r.digest = r.push_blob(REPO, BLOB)
        r.mode = request.param
        yield r


@pytest.fixture(scope="module")
def token_reg():
    with Registry("token", users=USERS) as r:
        r.digest = r.push_blob(REPO, BLOB)
        r.push_blob("other/repo", BLOB)
        yield r


def client(user="alice", password="s3cret", **kw):
    return RegistryClient(RegistrySettings(**kw), Creds(user, password))


def test_registry_access_blob_url_joins_like_overlaybd():
    assert blob_url("http://h/v2/r/blobs", "sha256:ab") == "http://h/v2/r/blobs/sha256:ab"
    assert blob_url("http://h/v2/r/blobs/", "sha256:ab") == "http://h/v2/r/blobs/sha256:ab"


def test_registry_access_size_and_ranges_match_pushed_bytes(reg):
    with client() as c:
        blob = c.open_blob(blob_url(f"{reg.url}/v2/{REPO}/blobs", reg.digest))
        assert blob.size == len(BLOB)
        rng = random.Random(7)
        n = len(BLOB)
        cases = [(0, 1), (0, 4096), (1, 1), (4095, 2), (n - 1, 1), (n - 4096, 4096), (0, n),
                 (123457, 1 << 20), (n // 2, 3)]
        cases += [(rng.randrange(n), rng.choice([1, 511, 4096, 65536, 300001]))
                  for _ in range(40)]
        for off, length in cases:
            want = BLOB[off:off + length]
            got = blob.read(off, length)
            assert len(got) == len(want) and got == want, (off, length)


def test_registry_access_reads_clamp_at_the_end(reg):
    with client() as c:
        blob = c.open_blob(reg.blob_url(REPO, reg.digest))
        n = len(BLOB)
        assert blob.read(n - 10, 1000) == BLOB[-10:]
        assert blob.read(n - 1, 1 << 30) == BLOB[-1:]
        assert blob.read(n, 10) == b""
        assert blob.read(n + 12345, 10) == b""
        assert blob.read(100, 0) == b""
        assert blob.read(0, 2 * n) == BLOB


def test_registry_access_missing_blob_is_blob_not_found(reg):
    with client(retries=1) as c:
        with pytest.raises(BlobNotFound) as e:
            c.open_blob(reg.blob_url(REPO, MISSING))
    assert MISSING in str(e.value) and "404" in str(e.value)
    assert e.value.reason == "No such file or directory"


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_registry_access_wrong_password_is_auth_error(mode):
    with Registry(mode, users=USERS) as r:
        digest = r.push_blob(REPO, b"x" * 100)
        for user, pw in (("alice", "wrong"), ("mallory", "s3cret"), (None, None)):
            with client(user, pw, retries=1) as c:
                t = time.monotonic()
                with pytest.raises(AuthError) as e:
                    c.open_blob(r.blob_url(REPO, digest))
                assert time.monotonic() - t < 5
            assert "401" in str(e.value) and e.value.reason == "Authentication failed"


def test_registry_access_basic_with_cred_json(tmp_path):
    with Registry("basic", users=USERS) as r:
        digest = r.push_blob(REPO, BLOB[:10000])
        cred = tmp_path / "cred.json"
        host = r.url.split("//", 1)[1]
        cred.write_text(json.dumps({"auths": {f"{host}/lib": {"username": "alice",
                                                              "password": "s3cret"}}}))
        provider = CredentialProvider(mode="file", path=str(cred), docker_config=False)
        with RegistryClient(RegistrySettings(), provider) as c:
            assert c.open_blob(r.blob_url(REPO, digest)).read(5, 20) == BLOB[5:25]


def test_registry_access_token_is_cached_per_scope(token_reg):
    hits = token_reg.tokens.hits
    before = len(hits)
    with client() as c:
        b1 = c.open_blob(token_reg.blob_url(REPO, token_reg.digest))
        for off in range(0, 1 << 20, 1 << 16):
            assert b1.read(off, 100) == BLOB[off:off + 100]
        assert len(hits) == before + 1
        assert hits[-1] == ("alice", f"repository:{REPO}:pull")
        assert token_reg.tokens.agents[-1] == f"tcmu-obd/{__version__}"
        # a second open of the same blob, and reads from another thread, reuse it
        b2 = c.open_blob(token_reg.blob_url(REPO, token_reg.digest))
        t = threading.Thread(target=lambda: b2.read(0, 10))
        t.start()
        t.join()
        assert len(hits) == before + 1
        # another repository is another scope, so another token
        c.open_blob(token_reg.blob_url("other/repo", token_reg.digest)).read(0, 10)
        assert len(hits) == before + 2


def test_registry_access_reauth_after_token_expires(token_reg):
    tokens = token_reg.tokens
    tokens.expires_in = 1        # the token answer says 1 s
    try:
        with client() as c:
            blob = c.open_blob(token_reg.blob_url(REPO, token_reg.digest))
            before = len(tokens.hits)
            assert blob.read(10, 10) == BLOB[10:20]
            time.sleep(1.1)
            assert blob.read(20, 10) == BLOB[20:30]
            assert len(tokens.hits) == before + 1
    finally:
        tokens.expires_in = 300


def test_registry_access_reauth_after_401_on_data(token_reg):
    tokens = token_reg.tokens
    with client() as c:
        url = token_reg.blob_url(REPO, token_reg.digest)
        blob = c.open_blob(url)
        before = len(tokens.hits)
        # the registry stops taking the token the client holds: its next data GET gets a 401
        c._resolved[url].authorization = "Bearer not-a-token"
        assert blob.read(1000, 5000) == BLOB[1000:6000]
        assert len(tokens.hits) == before + 1


def test_registry_access_expired_token_from_the_service_is_replaced(token_reg):
    tokens = token_reg.tokens
    before = len(tokens.hits)
    tokens.expired_next = 1
    with client() as c:
        assert c.open_blob(token_reg.blob_url(REPO, token_reg.digest)).read(0, 10) == BLOB[:10]
    assert len(tokens.hits) == before + 2


def test_registry_access_threads_share_one_client(reg):
    with client() as c:
        blob = c.open_blob(reg.blob_url(REPO, reg.digest))
        bad = []

        def worker(seed):
            rng = random.Random(seed)
            for _ in range(15):
                off, length = rng.randrange(len(BLOB)), rng.randrange(1, 200000)
                if blob.read(off, length) != BLOB[off:off + length]:
                    bad.append((off, length))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not bad


def _pieces(data, seed):
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 4096, 100000, 1 << 20, 3 << 20])
        yield data[pos:pos + n]
        pos += n


def test_registry_access_upload_blob_round_trip(reg):
    data = random.Random(99).randbytes(3 * (1 << 20) + 777)
    with client() as c:
        digest = upload_blob(c, f"{reg.url}/v2/up/one/blobs/uploads/", _pieces(data, 1),
                             chunk_size=1 << 20)
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        blob = c.open_blob(reg.blob_url("up/one", digest))
        assert blob.size == len(data) and blob.read(0, len(data)) == data
    assert reg.get_blob("up/one", digest) == data


def test_registry_access_blob_uploader_streams(reg):
    data = random.Random(5).randbytes(2 * (1 << 20) + 3)
    with client() as c:
        with BlobUploader(c, f"{reg.url}/v2/up/two/blobs/uploads/", chunk_size=300000) as up:
            for piece in _pieces(data, 2):
                up.write(piece)
            assert up.bytes_written == len(data)
        assert up.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert up.close() == up.digest
        assert c.open_blob(reg.blob_url("up/two", up.digest)).read(12345, 99999) == \
            data[12345:12345 + 99999]


def test_registry_access_empty_blob(reg):
    with client() as c:
        digest = upload_blob(c, f"{reg.url}/v2/up/empty/blobs/uploads/", [], chunk_size=4096)
        assert digest == "sha256:" + hashlib.sha256(b"").hexdigest()
        blob = c.open_blob(reg.blob_url("up/empty", digest))
        assert blob.size == 0 and blob.read(0, 100) == b""


def test_registry_access_uploader_refreshes_token_on_401(token_reg):
    data = random.Random(6).randbytes(200000)
    tokens = token_reg.tokens
    with client() as c:
        up = BlobUploader(c, f"{token_reg.url}/v2/up/three/blobs/uploads/", chunk_size=65536)
        user, scope = tokens.hits[-1]
        # the registry lists the actions in no fixed order
        assert user == "alice" and scope.rsplit(":", 1)[0] == "repository:up/three"
        assert sorted(scope.rsplit(":", 1)[1].split(",")) == ["pull", "push"]
        before = len(tokens.hits)
        up.write(data[:100000])
        up._auth = "Bearer revoked"      # the registry no longer takes our token
        up.write(data[100000:])
        assert up.close() == "sha256:" + hashlib.sha256(data).hexdigest()
        assert len(tokens.hits) == before + 1
    assert token_reg.get_blob("up/three", up.digest) == data


def test_registry_access_manifest_push_and_get(reg):
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    with client() as c:
        base = f"{reg.url}/v2/img/one"
        cfg_digest = upload_blob(c, base + "/blobs/uploads/", [config], 4096)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPES[0],
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cfg_digest, "size": len(config)},
            "layers": []}).encode()
        digest = push_manifest(c, base, "v1", manifest, MANIFEST_TYPES[0])
        assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
        for ref in ("v1", digest):
            got = get_manifest(c, f"{base}/manifests/{ref}")
            assert got.content == manifest and got.digest == digest
            assert got.media_type == MANIFEST_TYPES[0]
        # a repoBlobUrl is accepted as the repository URL too
        assert push_manifest(c, base + "/blobs", "v2", manifest, MANIFEST_TYPES[0]) == digest
        # without the OCI type in Accept the registry pretends it is not there
        with pytest.raises(BlobNotFound):
            get_manifest(c, f"{base}/manifests/v1", accept=[MANIFEST_TYPES[2]])
        with pytest.raises(BlobNotFound):
            get_manifest(c, f"{base}/manifests/nope")
        with pytest.raises(UnexpectedResponse):
            push_manifest(c, base, "bad", b"{not json", MANIFEST_TYPES[0])
