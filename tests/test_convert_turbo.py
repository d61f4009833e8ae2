"""`tcmu-obd convert --turboOCI` (ext4 and erofs) against the real test
registry: a 3-layer image (gzip, gzip, plain tar) with whiteouts, opaque
directories, hard links, symlinks and xattrs (tests/test_apply_untar.py's
layers) becomes a TurboOCI image whose layer descriptors are the meta blobs
(turboOCIv1.tar.gz: <fs>.fs.meta, .turbo.ociv1, gzip.meta for gzip layers)
with the TurboOCI annotations, diff_ids = sha256 of the uncompressed meta
tars, and the original layers left as they are.  The image from the
registry (`tcmu-obd run`, in-process and `--exit --cat`, and `image-config
--dir-root` + `export` mounted read-only by loop) equals the layers unpacked
in order; the registry is asked for the meta blobs and the original layers only, and
fewer bytes are fetched than the original layers hold.  Bad input: a zstd
layer, a wrong diff_id (no tag pushed)."""
import copy
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

from registry_server import Registry, require
from test_apply_untar import Model, compare, layer1, layer2, layer3, missing, tar_bytes
from test_convert_registry import ACCEPT, push_image
from tcmu_obd import service_config
from tcmu_obd.build import run
from tcmu_obd.serve import blockdev

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A = "containerd.io/snapshot/overlaybd/"


def tool(*args, check=True, timeout=300):
    code = "import sys; from tcmu_obd.cli.main import main; sys.argv[0] = 'tcmu-obd'; main()"
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if check and p.returncode:
        raise AssertionError(f"{args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def reg():
    require("docker-registry")
    with Registry(access_log=True) as r:
        r.host = r.url.split("//", 1)[1]
        yield r


@pytest.fixture(scope="module")
def source(reg):
    layers = [layer1(), layer2(), layer3()]
    tars = [tar_bytes(layers[0]), tar_bytes(layers[1]), tar_bytes(layers[2], tarfile.GNU_FORMAT)]
    cfg = push_image(reg, "src/turbo", "v1", [(tars[0], "gzip"), (tars[1], "gzip"), (tars[2], "none")],
                     index=False)
    model = Model()
    for layer in layers:
        model.apply(layer)
    r = requests.get(f"{reg.url}/v2/src/turbo/manifests/v1", headers={"Accept": ACCEPT}, timeout=30)
    return {"ref": f"{reg.host}/src/turbo:v1", "config": cfg, "model": model, "tars": tars,
            "manifest": r.json()}


def model_of(source, fstype):
    """The model tree; erofs has no lost+found."""
    model = copy.deepcopy(source["model"])
    if fstype == "erofs":
        del model.t["lost+found"]
    return model


def manifest_of(reg, repo, tag):
    r = requests.get(f"{reg.url}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def blob_gets(reg, since):
    return [p.split("/blobs/")[1] for m, p, _st in reg.access()[since:] if m == "GET" and "/blobs/" in p]


@pytest.mark.parametrize("fstype", ["ext4", "erofs"])
def test_convert_turbo_image_equals_the_layers(reg, source, tmp_path, fstype):
    if fstype == "erofs" and "erofs" not in open("/proc/filesystems").read():
        pytest.skip("the kernel has no erofs")
    repo = f"turbo/{fstype}"
    dst = f"{reg.host}/{repo}:v1"
    p = tool("convert", source["ref"], dst, "--turboOCI", "--fstype", fstype, "--oci")
    assert dst in p.stdout
    m = manifest_of(reg, repo, "v1")
    src_layers = source["manifest"]["layers"]
    assert len(m["layers"]) == 3
    cfg = json.loads(requests.get(f"{reg.url}/v2/{repo}/blobs/{m['config']['digest']}", timeout=30).content)
    metas = []
    for i, (d, s) in enumerate(zip(m["layers"], src_layers)):
        assert d["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        ann = d["annotations"]
        assert ann[A + "version"] == "0.1.0-turbo.ociv1"
        assert ann[A + "blob-digest"] == d["digest"] and ann[A + "blob-size"] == str(d["size"])
        assert ann[A + "turbo-oci/target-digest"] == s["digest"]
        assert ann[A + "turbo-oci/target-media-type"] == s["mediaType"]
        blob = requests.get(f"{reg.url}/v2/{repo}/blobs/{d['digest']}", timeout=30).content
        raw = gzip.decompress(blob)
        assert cfg["rootfs"]["diff_ids"][i] == "sha256:" + hashlib.sha256(raw).hexdigest()
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            names = sorted(tf.getnames())
        want = sorted([f"{fstype}.fs.meta", ".turbo.ociv1"] + (["gzip.meta"] if i < 2 else []))
        assert names == want
        metas.append(d["digest"])
        # the original layer is in the destination repository (mounted from the source)
        assert requests.head(f"{reg.url}/v2/{repo}/blobs/{s['digest']}", timeout=30).status_code == 200
    assert cfg["config"] == source["config"]["config"]

    # run: the tree, and only meta blobs and ranges of the original layers fetched
    since = len(reg.access())
    with run.RunningImage(dst, service_cfg=service_config.load(None)) as img:
        assert compare(model_of(source, fstype), img.mountpoint) > 40
        assert 0 < img.fetched() < sum(s["size"] for s in src_layers)
    gets = blob_gets(reg, since)
    assert set(metas) <= set(gets)
    assert set(gets) <= set(metas) | {s["digest"] for s in src_layers}
    p = tool("run", dst, "--exit", "--cat", "etc/passwd")
    assert "root:x:0:0:new" in p.stdout, p.stdout

    # image-config --dir-root + export, mounted by loop
    conf = tmp_path / "config.v1.json"
    tool("image-config", dst, conf, "--dir-root", tmp_path / "layers")
    disk = tmp_path / "disk.raw"
    tool("export", conf, disk)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with blockdev.raw_loop(str(disk)) as dev:
        subprocess.run(["mount", "-t", fstype, "-o", "ro", dev, str(mnt)], check=True)
        try:
            assert compare(model_of(source, fstype), str(mnt)) > 40
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def test_convert_turbo_refuses_zstd_and_bad_fstype(reg, tmp_path):
    push_image(reg, "src/zst", "v1", [(tar_bytes(layer1()), "zstd")], index=False)
    p = tool("convert", f"{reg.host}/src/zst:v1", f"{reg.host}/turbo/zst:v1", "--turboOCI", check=False)
    assert p.returncode and "layers[0] is zstd" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert requests.get(f"{reg.url}/v2/turbo/zst/manifests/v1", headers={"Accept": ACCEPT},
                        timeout=30).status_code == 404


def test_convert_turbo_wrong_diff_id(reg, tmp_path):
    raw = tar_bytes(layer1())
    push_image(reg, "src/baddiff", "v1", [(raw, "gzip")], diff_ids=["sha256:" + "ab" * 32], index=False)
    p = tool("convert", f"{reg.host}/src/baddiff:v1", f"{reg.host}/turbo/baddiff:v1", "--turboOCI",
             check=False)
    assert p.returncode and "rootfs.diff_ids[0] = sha256:" + "ab" * 32 in p.stderr, p.stderr
    assert "sha256:" + hashlib.sha256(raw).hexdigest() in p.stderr
    assert requests.get(f"{reg.url}/v2/turbo/baddiff/manifests/v1", headers={"Accept": ACCEPT},
                        timeout=30).status_code == 404



def test_convert_turbo_to_another_registry_uploads_the_originals(reg, source, tmp_path):
    """No cross-repository mount between registries: the original layers are
    uploaded to the destination, and the image runs from there alone."""
    with Registry() as other:
        host = other.url.split("//", 1)[1]
        dst = f"{host}/turbo/copy:v1"
        tool("convert", source["ref"], dst, "--turboOCI")
        for s in source["manifest"]["layers"]:
            r = requests.head(f"{other.url}/v2/turbo/copy/blobs/{s['digest']}", timeout=30)
            assert r.status_code == 200, s["digest"]
        p = tool("run", dst, "--exit", "--cat", "etc/passwd")
        assert "root:x:0:0:new" in p.stdout, p.stdout
