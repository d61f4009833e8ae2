"""`tcmu-obd convert` and `tcmu-obd run` against a real registry (Debian's
docker-registry on 127.0.0.1) with real FUSE, loop devices and ext4 (root).

The source image is an OCI index (linux/arm64 + linux/amd64) whose amd64
manifest has three layers (gzip, zstd, plain tar) holding whiteouts, opaque
directories, hard links, symlinks, xattrs, fifos and devices (the layers of
tests/test_apply_untar.py).  Checked: the manifest and config exactly as
docs/formats.md (Image manifests and annotations) says (media types, annotations, base layer first, diff_ids =
blob digests, the rest of the config kept), the base layer's tar wrapper, each
converted blob (tar + ZFile + LSMT, chain-ID UUIDs and parents), the mounted
tree against the model, `run --exit` and its fetched figure, layer reuse
through the database (identical manifest; a cross-repository mount), --mkfs
with --oci/zstd/16 KiB/256 MiB, and bad inputs (a corrupt layer tar, a wrong
diff_id, a layer larger than the disk, a source that is already overlaybd, a
registry refusing blob uploads or the manifest) failing clearly with no tag
pushed."""
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import requests

from registry_server import FaultProxy, Registry, require
from tcmu_obd.image import baselayer, layer as layer_mod
from tcmu_obd.build import convert, run
from tcmu_obd import service_config
from tcmu_obd.format import tar as tarwrap
from test_apply_untar import Model, compare, layer1, layer2, layer3, missing, tar_bytes

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "tcmu_obd.cli.convert"]
DOCKER_MT = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MT = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = ", ".join([DOCKER_MT, OCI_MT, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])
A = "containerd.io/snapshot/overlaybd/"


@pytest.fixture(scope="module")
def reg():
    require("docker-registry")
    with Registry() as r:
        r.host = r.url.split("//", 1)[1]
        yield r


def cli(*args, check=True, timeout=180):
    p = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    if check and p.returncode:
        raise AssertionError(f"{args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


# -- pushing source images with plain requests ------------------------------------------------------

def push_manifest(reg, repo, ref, doc, base=None):
    body = json.dumps(doc).encode()
    r = requests.put(f"{base or reg.url}/v2/{repo}/manifests/{ref}", data=body,
                     headers={"Content-Type": doc["mediaType"]}, timeout=30)
    assert r.status_code == 201, r.text
    return "sha256:" + hashlib.sha256(body).hexdigest()


def push_image(reg, repo, tag, layers, diff_ids=None, index=True):
    """layers: [(tar bytes, 'gzip'|'zstd'|'none')]; returns the config dict."""
    import zstandard
    descs, diffs = [], []
    for raw, comp in layers:
        diffs.append("sha256:" + hashlib.sha256(raw).hexdigest())
        blob = {"gzip": lambda b: gzip.compress(b, mtime=0),
                "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
                "none": lambda b: b}[comp](raw)
        mt = "application/vnd.oci.image.layer.v1.tar" + {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[comp]
        descs.append({"mediaType": mt, "digest": reg.push_blob(repo, blob), "size": len(blob)})
    cfg = {"architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
           "config": {"Cmd": ["/bin/sh"], "Env": ["A=<b>&c"]},
           "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
           "rootfs": {"type": "layers", "diff_ids": diff_ids or diffs}}
    cbytes = json.dumps(cfg).encode()
    m = {"schemaVersion": 2, "mediaType": OCI_MT,
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": reg.push_blob(repo, cbytes), "size": len(cbytes)},
         "layers": descs}
    if not index:
        push_manifest(reg, repo, tag, m)
        return cfg
    mdig = push_manifest(reg, repo, "amd64-" + tag, m)
    other = dict(m, layers=m["layers"][:1])
    odig = push_manifest(reg, repo, "arm64-" + tag, other)
    idx = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": OCI_MT, "digest": odig, "size": len(json.dumps(other)),
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": OCI_MT, "digest": mdig, "size": len(json.dumps(m)),
         "platform": {"os": "linux", "architecture": "amd64"}}]}
    push_manifest(reg, repo, tag, idx)
    return cfg


def get_manifest(reg, repo, ref):
    r = requests.get(f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}, timeout=30)
    return r


def no_tag(reg, repo, tag):
    assert get_manifest(reg, repo, tag).status_code == 404


@pytest.fixture(scope="module")
def source(reg):
    l1, l2, l3 = layer1(), layer2(), layer3()
    cfg = push_image(reg, "src/app", "v1", [(tar_bytes(l1), "gzip"), (tar_bytes(l2), "zstd"),
                                            (tar_bytes(l3, tarfile.GNU_FORMAT), "none")])
    model = Model()
    for layer in (l1, l2, l3):
        model.apply(layer)
    return {"ref": f"{reg.host}/src/app:v1", "config": cfg, "model": model}


# -- conversion on the base layer -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(reg, source, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conv")
    db = str(tmp / "layers.db")
    dst = f"{reg.host}/obd/app:v1"
    p = cli("convert", source["ref"], dst, "--db", db)
    r = get_manifest(reg, "obd/app", "v1")
    assert r.status_code == 200
    return {"dst": dst, "db": db, "stdout": p.stdout, "stderr": p.stderr, "manifest": r.content,
            "tmp": tmp}


def test_manifest_and_config(reg, source, converted):
    doc = json.loads(converted["manifest"])
    digest = "sha256:" + hashlib.sha256(converted["manifest"]).hexdigest()
    assert converted["stdout"].strip() == f"{converted['dst']}@{digest}"
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == DOCKER_MT
    assert list(doc) == ["schemaVersion", "mediaType", "config", "layers"]
    assert doc["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    layers = doc["layers"]
    assert len(layers) == 4          # base + 3
    for d in layers:
        assert d["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar"
        assert d["annotations"] == {A + "blob-digest": d["digest"], A + "blob-size": str(d["size"]),
                                    A + "version": "0.1.0"}
    cfg_bytes = reg.get_blob("obd/app", doc["config"]["digest"])
    assert len(cfg_bytes) == doc["config"]["size"]
    cfg = json.loads(cfg_bytes)
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [d["digest"] for d in layers]}
    src = source["config"]
    assert {k: v for k, v in cfg.items() if k != "rootfs"} == {k: v for k, v in src.items() if k != "rootfs"}
    assert b"\\u003cb\\u003e\\u0026c" in cfg_bytes            # Go's HTML-safe JSON

    # layer 0: the bundled base layer in a one-entry tar
    base = reg.get_blob("obd/app", layers[0]["digest"])
    with tarfile.open(fileobj=io.BytesIO(base)) as t:
        members = t.getmembers()
        assert [(m.name, m.mode, m.size, m.type) for m in members] == \
            [("overlaybd.commit", 0o444, baselayer.SIZE, tarfile.REGTYPE)]
        assert hashlib.sha256(t.extractfile(members[0]).read()).hexdigest() == baselayer.SHA256
    assert len(base) == 512 + baselayer.SIZE + (-baselayer.SIZE % 512) + 1024


def test_converted_blobs(reg, source, converted, tmp_path):
    doc = json.loads(converted["manifest"])
    chains = convert.chain_ids(source["config"]["rootfs"]["diff_ids"])
    prev = None
    for i, d in enumerate(doc["layers"][1:]):
        blob = reg.get_blob("obd/app", d["digest"])
        assert len(blob) == d["size"] and "sha256:" + hashlib.sha256(blob).hexdigest() == d["digest"]
        path = tmp_path / f"l{i}"
        path.write_bytes(blob)
        # overlaybd's own tar wrapper (docs/formats.md, Tar wrapper bytes): PAX header, payload at 1536
        off, size = tarwrap.detect(lambda o, n: blob[o:o + n], len(blob), str(path))
        assert off == 1536 and len(blob) == -(-(1536 + size) // 512) * 512 + 1024
        lay = layer_mod.open_layer(str(path))
        try:
            assert lay.wrappers == ["tar", "zfile"]
            assert lay.zinfo.algo == 1 and lay.zinfo.block_size == 4096
            assert lay.trailer.uuid == convert.uuid_of(chains[i]).upper()
            assert lay.trailer.parent_uuid == (prev or "00000000-0000-0000-0000-000000000000")
            assert lay.trailer.virtual_size == 64 << 30
        finally:
            lay.close()
        prev = convert.uuid_of(chains[i]).upper()


def test_run_matches_the_model(reg, source, converted):
    with run.RunningImage(converted["dst"], service_cfg=service_config.load(None)) as img:
        assert img.virtual_size == 64 << 30
        compare(source["model"], img.mountpoint)
        assert 0 < img.fetched() <= img.image_size


def test_run_cli_exit(reg, converted):
    p = cli("run", converted["dst"], "--exit", "--cat", "etc/passwd")
    names = [line.split()[-1] for line in p.stdout.splitlines() if line[:1] in "-dlcbp"]
    for name in ("etc", "usr", "opq", "lost+found", "outside"):
        assert name in names, p.stdout
    assert "root:x:0:0:new" in p.stdout
    assert "mounted read-only" in p.stderr and "fetched" in p.stderr
    line = [x for x in p.stderr.splitlines() if "after reading" in x][0]
    fetched, total = int(line.split("fetched ")[1].split()[0]), int(line.split(" of ")[1].split()[0])
    assert 0 < fetched < total
    assert not [m for m in open("/proc/self/mountinfo").read().splitlines() if "obd-run-" in m]


def test_convert_again_reuses_every_layer(reg, source, converted):
    p = cli("convert", source["ref"], converted["dst"], "--db", converted["db"])
    assert p.stderr.count(" reused sha256:") == 3 and "(0 converted, 3 reused)" in p.stderr
    assert get_manifest(reg, "obd/app", "v1").content == converted["manifest"]
    # another repository on the same registry: the blobs are mounted, not converted again
    p = cli("convert", source["ref"], f"{reg.host}/obd/other:v2", "--db", converted["db"])
    assert p.stderr.count("mounted from another repository") == 3
    assert get_manifest(reg, "obd/other", "v2").content == converted["manifest"]


def test_mkfs_oci_zstd(reg, source, tmp_path):
    dst = f"{reg.host}/obd/mkfs:v1"
    cli("convert", source["ref"], dst, "--mkfs", "--vsize", "256M", "--oci", "--algorithm", "zstd",
        "--bs", "16", "--db", str(tmp_path / "db"))
    r = get_manifest(reg, "obd/mkfs", "v1")
    doc = json.loads(r.content)
    assert doc["mediaType"] == OCI_MT and doc["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert len(doc["layers"]) == 3
    assert {d["mediaType"] for d in doc["layers"]} == {"application/vnd.oci.image.layer.v1.tar"}
    first = tmp_path / "first"
    first.write_bytes(reg.get_blob("obd/mkfs", doc["layers"][0]["digest"]))
    lay = layer_mod.open_layer(str(first))
    try:
        assert lay.zinfo.algo == 2 and lay.zinfo.block_size == 16384
        assert lay.trailer.virtual_size == 256 << 20
    finally:
        lay.close()
    with run.RunningImage(dst, service_cfg=service_config.load(None)) as img:
        assert img.virtual_size == 256 << 20
        compare(source["model"], img.mountpoint)


# -- bad inputs: clear errors, no tag -----------------------------------------------------------------------

def test_corrupt_layer_tar(reg, tmp_path):
    good = tar_bytes([("a", tarfile.REGTYPE, b"a" * 3000, {}), ("b", tarfile.REGTYPE, b"b", {})])
    bad = bytearray(tar_bytes([("x", tarfile.REGTYPE, b"x" * 3000, {}), ("y", tarfile.REGTYPE, b"y", {}),
                               ("z", tarfile.REGTYPE, b"z", {})]))
    second = tarfile.open(fileobj=io.BytesIO(bytes(bad))).getmembers()[1].offset
    bad[second + 1] ^= 0x21
    push_image(reg, "src/corrupt", "v1", [(good, "gzip"), (bytes(bad), "gzip")], index=False)
    p = cli("convert", f"{reg.host}/src/corrupt:v1", f"{reg.host}/obd/corrupt:v1",
            "--db", str(tmp_path / "db"), check=False)
    assert p.returncode == 1
    assert "layer 1" in p.stderr and "corrupt tar" in p.stderr and "bad checksum" in p.stderr
    no_tag(reg, "obd/corrupt", "v1")


def test_wrong_diff_id(reg, tmp_path):
    t = tar_bytes([("a", tarfile.REGTYPE, b"a", {})])
    push_image(reg, "src/diffid", "v1", [(t, "gzip")], diff_ids=["sha256:" + "ab" * 32], index=False)
    p = cli("convert", f"{reg.host}/src/diffid:v1", f"{reg.host}/obd/diffid:v1",
            "--db", str(tmp_path / "db"), check=False)
    assert p.returncode == 1 and "checksum mismatch" in p.stderr and "ab" * 32 in p.stderr
    no_tag(reg, "obd/diffid", "v1")


def test_layer_larger_than_the_disk(reg, tmp_path):
    t = tar_bytes([("big", tarfile.REGTYPE, os.urandom(1 << 20) * 40, {})])
    push_image(reg, "src/big", "v1", [(t, "none")], index=False)
    p = cli("convert", f"{reg.host}/src/big:v1", f"{reg.host}/obd/big:v1", "--mkfs", "--vsize", "16M",
            "--db", str(tmp_path / "db"), check=False)
    assert p.returncode == 1 and "does not fit" in p.stderr
    no_tag(reg, "obd/big", "v1")


def test_source_already_overlaybd(reg, converted, tmp_path):
    p = cli("convert", converted["dst"], f"{reg.host}/obd/again:v1", "--db", str(tmp_path / "db"),
            check=False)
    assert p.returncode == 1 and "already an overlaybd image" in p.stderr
    no_tag(reg, "obd/again", "v1")


class RefusingProxy(FaultProxy):
    """Answers 500 to blob uploads ("blobs") or to manifest pushes ("manifest")."""

    refuse = None

    def _pick(self, method, path, rng_header):
        if self.refuse == "blobs" and method in ("POST", "PATCH", "PUT") and "/blobs/uploads" in path:
            return "500"
        if self.refuse == "manifest" and method == "PUT" and "/manifests/" in path:
            return "500"
        return None


@pytest.mark.parametrize("what", ["blobs", "manifest"])
def test_registry_refuses_the_push(reg, source, tmp_path, what):
    with RefusingProxy(reg.url) as proxy:
        proxy.refuse = what
        host = proxy.url.split("//", 1)[1]
        p = cli("convert", source["ref"], f"{host}/obd/refused-{what}:v1", "--db",
                str(tmp_path / "db"), check=False)
    assert p.returncode == 1
    assert "HTTP 500" in p.stderr, p.stderr
    no_tag(reg, f"obd/refused-{what}", "v1")


def test_run_serves_until_sigterm(reg, converted, tmp_path):
    import signal
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.Popen(CLI + ["run", converted["dst"], "--mount", str(mnt)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = p.stdout.readline().strip()
        assert line == str(mnt), p.stderr.read() if not line else line
        assert (mnt / "etc" / "passwd").read_bytes() == b"root:x:0:0:new\n"
        assert os.path.islink(mnt / "usr" / "bin" / "rel")
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read()
    assert "SIGTERM: unmounting" in err and "fetched" in err
    assert not os.path.ismount(mnt) and os.listdir(mnt) == []


def test_partial_reuse_and_stale_rows(reg, source, tmp_path):
    """A second image sharing the first layer reuses it and converts the rest
    on top of it; when a reused blob is gone from the registry, that layer and
    every layer above it are converted again (never stacked on a new parent)."""
    db = str(tmp_path / "db")
    l1, l2, l3 = layer1(), layer2(), layer3()
    push_image(reg, "src/shared", "a", [(tar_bytes(l1), "gzip"), (tar_bytes(l2), "zstd")], index=False)
    push_image(reg, "src/shared", "b", [(tar_bytes(l1), "gzip"), (tar_bytes(l3, tarfile.GNU_FORMAT), "none")],
               index=False)
    cli("convert", f"{reg.host}/src/shared:a", f"{reg.host}/obd/shared:a", "--db", db)
    p = cli("convert", f"{reg.host}/src/shared:b", f"{reg.host}/obd/shared:b", "--db", db)
    assert "(1 converted, 1 reused)" in p.stderr, p.stderr
    a = json.loads(get_manifest(reg, "obd/shared", "a").content)
    b = json.loads(get_manifest(reg, "obd/shared", "b").content)
    assert a["layers"][:2] == b["layers"][:2] and a["layers"][2] != b["layers"][2]
    model = Model()
    model.apply(l1)
    model.apply(l3)
    with run.RunningImage(f"{reg.host}/obd/shared:b", service_cfg=service_config.load(None)) as img:
        compare(model, img.mountpoint)

    # the first converted layer disappears from the repository: both layers are redone
    r = requests.delete(f"{reg.url}/v2/obd/shared/blobs/{b['layers'][1]['digest']}", timeout=30)
    assert r.status_code == 202
    p = cli("convert", f"{reg.host}/src/shared:b", f"{reg.host}/obd/shared:b", "--db", db)
    assert "(2 converted, 0 reused)" in p.stderr, p.stderr
    with run.RunningImage(f"{reg.host}/obd/shared:b", service_cfg=service_config.load(None)) as img:
        compare(model, img.mountpoint)
