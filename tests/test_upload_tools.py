"""The registry side of the tools against a real docker-registry on loopback:
overlaybd-commit / overlaybd-merge --upload (the blob is the local ZFile,
byte for byte; a failed run cancels its upload session and leaves no blob;
Basic auth from --cred_file_path), `tcmu-obd push-layer`, and `tcmu-obd
image-config` (manifest -> the snapshotter's config.v1.json, which then opens
the image lazily from the registry and reads the ext4 superblock).  Tools are
run as a user would, through their console entry points in a subprocess."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import requests

from registry_server import FaultProxy, Registry, require
from tcmu_obd.image import assemble, baselayer
from tcmu_obd import service_config
from tcmu_obd.format import zfile
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.remote.distribution import push_manifest
from tcmu_obd.remote.registry import RegistryClient
from tcmu_obd.image.rw import RWLayer

require("docker-registry")

TOOLS = {"overlaybd-commit": "commit", "overlaybd-merge": "merge", "tcmu-obd": "main"}
A = "containerd.io/snapshot/overlaybd/"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DIGEST_LINE = re.compile(rb"digest: (sha256:[0-9a-f]{64})\s*$")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A hermetic environment: no docker config.json, no /opt/overlaybd/cred.json match."""
    d = tmp_path_factory.mktemp("dockercfg")
    e = dict(os.environ, DOCKER_CONFIG=str(d))
    return e


def tool(env, name, *args, check=True):
    code = f"import sys; from tcmu_obd.cli.{TOOLS[name]} import main; sys.argv[0] = {name!r}; main()"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, env=env,
                       timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{name} {args} failed ({r.returncode}): {r.stderr.decode()}")
    return r


def printed_digest(r):
    m = DIGEST_LINE.search(r.stderr)
    assert m, r.stderr
    return m.group(1).decode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def reg():
    with Registry() as r:
        yield r


def uploads(reg, repo):
    return f"{reg.url}/v2/{repo}/blobs/uploads/"


def stored_blobs(reg):
    root = os.path.join(reg.tmp, "data", "docker", "registry", "v2", "blobs", "sha256")
    out = set()
    for _dirpath, dirnames, _files in os.walk(root):
        out.update(n for n in dirnames if len(n) == 64)
    return out


def make_rw(tmp, name="rw", regions=6):
    """An RW layer with `regions` separate 1 MiB random extents (separate
    records, so a commit reads them one by one) and its expected content."""
    d, i = os.path.join(tmp, name + ".d"), os.path.join(tmp, name + ".i")
    up = RWLayer.create(d, i, 64 << 20)
    extents = []
    for k in range(regions):
        data = os.urandom(1 << 20)
        up.write(data, (2 * k + 1) << 20)
        extents.append(((2 * k + 1) << 20, data))
    up.close()
    return d, i, extents


def check_layer(path, extents):
    with Image([open_layer(path)]) as image:
        for off, data in extents:
            assert image.read(off, len(data)) == data


# -- overlaybd-commit / overlaybd-merge --upload -----------------------------------------------

@pytest.mark.parametrize("flags", [[], ["--compress_threads", "2", "--algorithm", "zstd", "--bs", "16"]])
def test_commit_upload_is_the_local_zfile(reg, env, tmp_path, flags):
    d, i, extents = make_rw(str(tmp_path))
    out = tmp_path / "out"
    r = tool(env, "overlaybd-commit", "-z", *flags, "--upload", uploads(reg, "obd/commit"),
             "--upload_bs", "256", d, i, out)
    local = out.read_bytes()
    digest = printed_digest(r)
    assert digest == sha256(local)
    assert reg.get_blob("obd/commit", digest) == local
    check_layer(out, extents)
    info = json.loads(tool(env, "tcmu-obd", "info", "--json", out).stdout)
    assert info["wrappers"] == ["zfile"]
    # the same commit without --upload differs only in the overwritten ZFile header
    out2 = tmp_path / "out2"
    tool(env, "overlaybd-commit", "-z", *flags, d, i, out2)
    plain = out2.read_bytes()
    assert len(plain) == len(local) and plain[zfile.HT_SIZE:] == local[zfile.HT_SIZE:]
    assert plain[:zfile.HT_SIZE] != local[:zfile.HT_SIZE]


@pytest.mark.parametrize("args,what", [
    (["-z", "-t", "--upload", "U"], b"-t and --upload"),
    (["--upload", "U"], b"needs ZFile"),
    (["-z", "--upload", "http://127.0.0.1:1/v2/x/manifests/y"], b"/blobs/uploads/"),
    (["-z", "--upload", "ftp://h/v2/x/blobs/uploads/"], b"http(s) URL"),
    (["-z", "--upload", "U", "--tls_key_path", "/nonexistent/key"], b"--tls_key_path"),
    (["-z", "--upload", "U", "--upload_bs", "-1"], b"--upload_bs"),
])
def test_commit_upload_usage_errors(reg, env, tmp_path, args, what):
    d, i, _ = make_rw(str(tmp_path), regions=1)
    before = stored_blobs(reg)
    args = [uploads(reg, "obd/usage") if a == "U" else a for a in args]
    r = tool(env, "overlaybd-commit", *args, d, i, tmp_path / "out", check=False)
    assert r.returncode != 0 and r.stderr.startswith(b"error:") and what in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    assert stored_blobs(reg) == before


def _merge_config(env, tmp_path, extra_lower=None):
    """base layer + one committed ZFile/tar layer; returns (config path, extents)."""
    d, i, extents = make_rw(str(tmp_path), "l1", regions=2)
    tool(env, "overlaybd-commit", "-z", "-t", d, i, tmp_path / "l1")
    lowers = [{"file": baselayer.path()}, {"file": str(tmp_path / "l1")}]
    if extra_lower:
        lowers.append({"file": str(extra_lower)})
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps({"lowers": lowers}))
    return cfg, extents


def test_merge_upload_plain_and_tar(reg, env, tmp_path):
    cfg, extents = _merge_config(env, tmp_path)
    (tmp_path / "defaults.json").write_text("{}")          # hermetic: every key at its default
    svc = ["--service_config_path", str(tmp_path / "defaults.json")]
    r = tool(env, "overlaybd-merge", *svc, "--upload", uploads(reg, "obd/merge"), cfg,
             tmp_path / "m")
    merged = (tmp_path / "m").read_bytes()
    digest = printed_digest(r)
    assert digest == sha256(merged) and reg.get_blob("obd/merge", digest) == merged
    check_layer(tmp_path / "m", extents)
    # -t with --upload: the local file is tar-wrapped, the blob is the ZFile inside it
    r = tool(env, "overlaybd-merge", *svc, "-t", "--upload", uploads(reg, "obd/merge"),
             "--upload_bs", "128", cfg, tmp_path / "mt")
    info = json.loads(tool(env, "tcmu-obd", "info", "--json", tmp_path / "mt").stdout)
    assert info["wrappers"] == ["tar", "zfile"]
    off, size = info["tar_payload"]["offset"], info["tar_payload"]["size"]
    payload = (tmp_path / "mt").read_bytes()[off:off + size]
    digest = printed_digest(r)
    assert payload == merged and digest == sha256(payload)
    assert reg.get_blob("obd/merge", digest) == payload
    with Image([open_layer(tmp_path / "mt")]) as image:
        assert image.pread(1080, 2) == b"\x53\xef"
    # -t without --upload does nothing (overlaybd's behaviour), with a warning
    r = tool(env, "overlaybd-merge", *svc, "-t", cfg, tmp_path / "m2")
    assert b"-t has no effect" in r.stderr
    assert (tmp_path / "m2").read_bytes() == merged     # merge never overwrites the header
    assert json.loads(tool(env, "tcmu-obd", "info", "--json", tmp_path / "m2").stdout)["wrappers"] \
        == ["zfile"]


def _corrupt_layer(env, tmp_path):
    """A committed ZFile layer whose data goes bad about 80 % of the way in."""
    d, i, _ = make_rw(str(tmp_path), "bad", regions=6)
    good = tmp_path / "good"
    tool(env, "overlaybd-commit", "-z", d, i, good)
    raw = bytearray(good.read_bytes())
    raw[len(raw) * 4 // 5] ^= 0xFF
    bad = tmp_path / "badlayer"
    bad.write_bytes(raw)
    return bad


@pytest.mark.parametrize("which", ["commit", "merge"])
def test_failed_run_cancels_the_upload(reg, env, tmp_path, which):
    bad = _corrupt_layer(env, tmp_path)
    before = stored_blobs(reg)
    with FaultProxy(reg.url) as proxy:
        up = f"{proxy.url}/v2/obd/abort/blobs/uploads/"
        if which == "commit":
            r = tool(env, "overlaybd-commit", "--commit_sealed", "-z", "--upload", up,
                     "--upload_bs", "64", bad, tmp_path / "out", check=False)
        else:
            cfg, _ = _merge_config(env, tmp_path, extra_lower=bad)
            (tmp_path / "defaults.json").write_text("{}")
            r = tool(env, "overlaybd-merge", "--service_config_path", str(tmp_path / "defaults.json"),
                     "--upload", up, "--upload_bs", "64", cfg, tmp_path / "out", check=False)
        seen = [(m, p) for m, p, _r, _f in proxy.seen]
    assert r.returncode != 0 and b"crc" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    methods = [m for m, _ in seen]
    assert methods[0] == "POST" and "PATCH" in methods, methods   # it failed mid-way
    assert "PUT" not in methods and methods[-1] == "DELETE", methods
    # the session is gone, and nothing new was stored as a blob
    session = seen[-1][1]
    assert requests.get(reg.url + session, timeout=10).status_code == 404
    assert requests.get(reg.url + session.split("?")[0], timeout=10).status_code == 404
    assert stored_blobs(reg) == before


def test_basic_auth_from_cred_file(env, tmp_path):
    users = {"alice": "s3cret"}
    with Registry(auth="basic", users=users) as reg:
        d, i, extents = make_rw(str(tmp_path), regions=2)
        host = reg.url.split("://", 1)[1]
        up = uploads(reg, "team/app")
        r = tool(env, "overlaybd-commit", "-z", "--upload", up, d, i, tmp_path / "anon", check=False)
        assert r.returncode != 0 and b"Basic auth asked for and no credentials" in r.stderr
        assert not (tmp_path / "anon").exists()
        # overlaybd's first-match rule: the first matching key wins, even with a wrong password
        cred = tmp_path / "cred.json"
        cred.write_text(json.dumps({"auths": {f"{host}/team": {"username": "alice",
                                                                "password": "wrong"},
                                              host: {"username": "alice", "password": "s3cret"}}}))
        r = tool(env, "overlaybd-commit", "-z", "--upload", up, "--cred_file_path", cred, d, i,
                 tmp_path / "bad", check=False)
        assert r.returncode != 0 and b"Authentication failed" in r.stderr, r.stderr
        cred.write_text(json.dumps({"auths": {f"{host}/team/app": {"username": "alice",
                                                                    "password": "s3cret"}}}))
        r = tool(env, "overlaybd-commit", "-z", "--upload", up, "--cred_file_path", cred, d, i,
                 tmp_path / "out")
        digest = printed_digest(r)
        assert reg.get_blob("team/app", digest) == (tmp_path / "out").read_bytes()
        check_layer(tmp_path / "out", extents)
        # push-layer takes a cred.json too
        r = tool(env, "tcmu-obd", "push-layer", "--cred-file", cred, tmp_path / "out",
                 f"{host}/team/app")
        assert r.stdout.decode().split() == [digest, str(os.path.getsize(tmp_path / "out"))]
        r = tool(env, "tcmu-obd", "push-layer", tmp_path / "out", f"{host}/team/app", check=False)
        assert r.returncode != 0 and b"Authentication failed" in r.stderr


def test_push_layer(reg, env, tmp_path):
    host = reg.url.split("://", 1)[1]
    r = tool(env, "tcmu-obd", "push-layer", baselayer.path(), f"{host}/obd/push")
    assert r.stdout.decode().split() == ["sha256:" + baselayer.SHA256, str(baselayer.SIZE)]
    f = tmp_path / "small"
    f.write_bytes(b"any file at all\n")
    r = tool(env, "tcmu-obd", "push-layer", "--json", f, f"{reg.url}/v2/obd/push")
    doc = json.loads(r.stdout)
    assert doc["digest"] == sha256(f.read_bytes()) and doc["size"] == 16
    assert doc["repoBlobUrl"] == f"{reg.url}/v2/obd/push/blobs"
    assert doc["url"] == f"{reg.url}/v2/obd/push/blobs/{doc['digest']}"
    assert reg.get_blob("obd/push", doc["digest"]) == f.read_bytes()
    for bad, what in [(f"{host}/Obd/Push", b"not a valid repository"),
                      (f"{host}/obd/push:v1", b"not a tag or digest")]:
        r = tool(env, "tcmu-obd", "push-layer", f, bad, check=False)
        assert r.returncode != 0 and what in r.stderr, r.stderr


# -- image-config ------------------------------------------------------------------------------

def _push(reg, repo, data):
    return reg.push_blob(repo, data), len(data)


def _desc(digest, size, media_type="application/vnd.oci.image.layer.v1.tar", overlaybd=True):
    d = {"mediaType": media_type, "digest": digest, "size": size}
    if overlaybd:
        d["annotations"] = {A + "blob-digest": digest, A + "blob-size": str(size),
                            A + "version": "0.1.0"}
    return d


def _manifest(reg, repo, layers, media_type=OCI_MANIFEST, arch="amd64"):
    cfg = json.dumps({"architecture": arch, "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]}}).encode()
    cdigest, csize = _push(reg, repo, cfg)
    ctype = ("application/vnd.oci.image.config.v1+json" if media_type == OCI_MANIFEST
             else "application/vnd.docker.container.image.v1+json")
    return json.dumps({"schemaVersion": 2, "mediaType": media_type,
                       "config": {"mediaType": ctype, "digest": cdigest, "size": csize},
                       "layers": layers}).encode()


@pytest.fixture(scope="module")
def image(reg, env, tmp_path_factory):
    """obd/img: the bundled base layer + a layer made with the tools (tar(zfile)),
    as an OCI manifest (:oci), a Docker manifest (:docker), an index (:multi, with
    a plain arm64 image next to it), and a plain OCI image (:plain)."""
    tmp = tmp_path_factory.mktemp("img")
    repo = "obd/img"
    d, i = tmp / "l1.d", tmp / "l1.i"
    up = RWLayer.create(str(d), str(i), 0)
    payload = os.urandom(1 << 20)
    up.write(payload, 300 << 20)
    up.close()
    tool(env, "overlaybd-commit", "-z", "-t", d, i, tmp / "l1")
    host = reg.url.split("://", 1)[1]
    layers = []
    for path in (baselayer.path(), tmp / "l1"):
        digest, size = tool(env, "tcmu-obd", "push-layer", path, f"{host}/{repo}").stdout.split()
        layers.append(_desc(digest.decode(), int(size)))
    plain_digest, plain_size = _push(reg, repo, b"not an overlaybd layer")
    plain = _desc(plain_digest, plain_size, overlaybd=False)
    client = RegistryClient()
    base = f"{reg.url}/v2/{repo}"
    refs = {}
    m = _manifest(reg, repo, layers)
    refs["oci"] = push_manifest(client, base, "oci", m, OCI_MANIFEST)
    refs["docker"] = push_manifest(client, base, "docker", _manifest(
        reg, repo, [dict(l, mediaType="application/vnd.docker.image.rootfs.diff.tar") for l in layers],
        DOCKER_MANIFEST), DOCKER_MANIFEST)
    pm = _manifest(reg, repo, [plain], arch="arm64")
    refs["plain"] = push_manifest(client, base, "plain", pm, OCI_MANIFEST)
    refs["mixed"] = push_manifest(client, base, "mixed", _manifest(reg, repo, [layers[0], plain]),
                                  OCI_MANIFEST)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": refs["plain"], "size": len(pm),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": OCI_MANIFEST, "digest": refs["oci"], "size": len(m),
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode()
    refs["multi"] = push_manifest(client, base, "multi", index, OCI_INDEX)
    client.close()
    return {"repo": repo, "host": host, "layers": layers, "refs": refs, "payload": payload}


def _svc(tmp_path):
    svc = tmp_path / "overlaybd.json"
    svc.write_text(json.dumps({
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
        "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")},
        "tcmuObd": {"registryTimeoutSec": 5, "registryRetries": 2, "readDeadlineSec": 20},
    }))
    return service_config.load(str(svc))


def test_image_config_opens_the_remote_image(reg, env, image, tmp_path):
    out, result, root = tmp_path / "config.v1.json", tmp_path / "init-debug.log", tmp_path / "fs"
    tool(env, "tcmu-obd", "image-config", f"{image['host']}/{image['repo']}:oci", out,
         "--dir-root", root, "--result-file", result)
    lowers = [{"digest": l["digest"], "size": l["size"],
               "dir": f"{root}/{l['digest'].split(':')[1]}"} for l in image["layers"]]
    want = {"repoBlobUrl": f"{reg.url}/v2/{image['repo']}/blobs", "lowers": lowers, "upper": {},
            "resultFile": str(result)}
    assert out.read_text() == json.dumps(want, separators=(",", ":"))    # Go's compact order
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"
    with assemble.open_image(str(out), _svc(tmp_path)) as img:
        assert img.virtual_size == 64 << 30
        assert img.pread(1080, 2) == b"\x53\xef"
        assert img.read(300 << 20, 1 << 20) == image["payload"]
    assert result.read_text() == "success"


@pytest.mark.parametrize("ref", ["docker", "multi", "DIGEST"])
def test_image_config_docker_index_and_digest_refs(reg, env, image, tmp_path, ref):
    ref = "@" + image["refs"]["oci"] if ref == "DIGEST" else ":" + ref
    out = tmp_path / "c.json"
    tool(env, "tcmu-obd", "image-config", f"{image['host']}/{image['repo']}{ref}", out)
    doc = json.loads(out.read_text())
    assert list(doc) == ["repoBlobUrl", "lowers", "upper", "resultFile"]
    assert doc["lowers"] == [{"digest": l["digest"], "size": l["size"]} for l in image["layers"]]
    assert doc["upper"] == {} and doc["resultFile"] == ""
    with assemble.open_image(str(out), _svc(tmp_path)) as img:
        assert img.pread(1080, 2) == b"\x53\xef"


@pytest.mark.parametrize("ref,args,what", [
    ("plain", [], b"not an overlaybd image"),
    ("mixed", [], b"1 of 2 layers have no containerd.io/snapshot/overlaybd/blob-digest"),
    ("multi", ["--platform", "linux/arm64"], b"not an overlaybd image"),
    ("multi", ["--platform", "linux/s390x"], b"no manifest for linux/s390x"),
    ("nosuchtag", [], b"No such file"),
])
def test_image_config_errors(env, image, tmp_path, ref, args, what):
    out = tmp_path / "c.json"
    r = tool(env, "tcmu-obd", "image-config", f"{image['host']}/{image['repo']}:{ref}", out, *args,
             check=False)
    assert r.returncode != 0 and r.stderr.startswith(b"error:") and what in r.stderr, r.stderr
    assert not out.exists()
