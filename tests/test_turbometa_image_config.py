"""`tcmu-obd image-config` of TurboOCI images (tcmu_obd.image.turbometa), against
the real test registry: each TurboOCI layer's meta blob (turboOCIv1.tar.gz) is
fetched and unpacked into --dir-root/<meta digest hex>, and its lower names the
meta file, the original layer (targetDigest) and, for a gzip original, the gzip
index, as the overlaybd snapshotter writes them; a second run reuses the
unpacked files; a damaged or hostile meta archive is refused by name."""
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from registry_server import Registry
from tcmu_obd.image import turbometa
from tcmu_obd.remote.distribution import push_manifest
from tcmu_obd.remote.imageref import parse_ref
from tcmu_obd.remote.registry import RegistryClient

A = "containerd.io/snapshot/overlaybd/"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"


def tool(*args, check=True, env=None):
    code = "import sys; from tcmu_obd.cli.main import main; sys.argv[0] = 'tcmu-obd'; main()"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, timeout=120,
                       env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"tcmu-obd {args} failed ({r.returncode}): {r.stderr.decode()}")
    return r


class Special:
    """A member that is not a regular file: its tar type."""
    def __init__(self, type_):
        self.type = type_


def meta_archive(members):
    """A gzip'd tar of (name, bytes or Special) at its root, as
    accelerated-container-image's convertor builds turboOCIv1.tar.gz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if isinstance(data, bytes):
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                ti.type = data.type
                ti.linkname = "elsewhere"
                tf.addfile(ti)
    return gzip.compress(buf.getvalue())


@pytest.fixture(scope="module")
def reg():
    with Registry() as r:
        yield r


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, DOCKER_CONFIG=str(tmp_path_factory.mktemp("dockercfg")))


def push_image(reg, repo, tag, layers):
    """layers: (meta archive bytes, original layer bytes, original media type) or
    ("native", blob bytes); returns the layer descriptors pushed."""
    descs = []
    for layer in layers:
        if layer[0] == "native":
            d = reg.push_blob(repo, layer[1])
            descs.append({"mediaType": TAR, "digest": d, "size": len(layer[1]),
                          "annotations": {A + "blob-digest": d, A + "blob-size": str(len(layer[1])),
                                          A + "version": "0.1.0"}})
            continue
        meta, original, media = layer
        md, od = reg.push_blob(repo, meta), reg.push_blob(repo, original)
        descs.append({"mediaType": GZ, "digest": md, "size": len(meta), "annotations": {
            A + "version": "0.1.0-turbo.ociv1", A + "blob-digest": md, A + "blob-size": str(len(meta)),
            A + "turbo-oci/target-digest": od, A + "turbo-oci/target-media-type": media}})
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    cd = reg.push_blob(repo, cfg)
    m = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd,
                               "size": len(cfg)}, "layers": descs}).encode()
    with RegistryClient() as client:
        push_manifest(client, f"{reg.url}/v2/{repo}", tag, m, OCI_MANIFEST)
    return descs


def test_turbometa_image_config_writes_the_snapshotters_lowers(reg, env, tmp_path):
    m1 = meta_archive([("ext4.fs.meta", b"meta one"), (".turbo.ociv1", b""), ("gzip.meta", b"gz one")])
    m2 = meta_archive([("ext4.fs.meta", b"meta two"), (".turbo.ociv1", b"")])
    descs = push_image(reg, "t/img", "v1", [("native", b"a native base layer"),
                                           (m1, b"original one", GZ), (m2, b"original two", TAR)])
    host = reg.url.split("://", 1)[1]
    out, root = tmp_path / "config.v1.json", tmp_path / "layers"
    tool("image-config", f"{host}/t/img:v1", out, "--dir-root", root, env=env)
    doc = json.loads(out.read_text())
    d1, d2 = (root / descs[i]["digest"].split(":")[1] for i in (1, 2))
    assert doc["lowers"] == [
        {"digest": descs[0]["digest"], "size": descs[0]["size"],
         "dir": str(root / descs[0]["digest"].split(":")[1])},
        {"dir": str(d1), "file": str(d1 / "ext4.fs.meta"),
         "targetDigest": descs[1]["annotations"][A + "turbo-oci/target-digest"],
         "gzipIndex": str(d1 / "gzip.meta")},
        {"dir": str(d2), "file": str(d2 / "ext4.fs.meta"),
         "targetDigest": descs[2]["annotations"][A + "turbo-oci/target-digest"]}]
    assert (d1 / "ext4.fs.meta").read_bytes() == b"meta one" and (d1 / "gzip.meta").read_bytes() == b"gz one"
    assert (d2 / "ext4.fs.meta").read_bytes() == b"meta two" and not (d2 / "gzip.meta").exists()
    # a second run reuses what is unpacked: the registry is not asked for the meta blobs again
    (d1 / "ext4.fs.meta").write_bytes(b"kept")
    tool("image-config", f"{host}/t/img:v1", out, "--dir-root", root, env=env)
    assert (d1 / "ext4.fs.meta").read_bytes() == b"kept"
    r = tool("image-config", f"{host}/t/img:v1", tmp_path / "x.json", check=False, env=env)
    assert r.returncode != 0 and b"TurboOCI layers" in r.stderr and b"--dir-root" in r.stderr, r.stderr


def test_turbometa_prefers_erofs_where_the_kernel_has_it(reg, tmp_path):
    both = meta_archive([("erofs.fs.meta", b"e"), ("ext4.fs.meta", b"x"), (".turbo.ociv1", b"")])
    only_ext4 = meta_archive([("ext4.fs.meta", b"y"), (".turbo.ociv1", b"")])
    push_image(reg, "t/fs", "v1", [(both, b"o1", TAR), (only_ext4, b"o2", TAR)])
    push_image(reg, "t/fs", "v2", [(both, b"o1", TAR), (both, b"o3", TAR)])
    from tcmu_obd.remote import imageref
    for tag, erofs_ok, want in (("v1", False, ["ext4.fs.meta"] * 2), ("v2", True, ["erofs.fs.meta"] * 2),
                                ("v1", True, None)):
        ref = parse_ref(f"{reg.url.split('://', 1)[1]}/t/fs:{tag}", True)
        with RegistryClient() as client:
            manifest, where = imageref.fetch_image_manifest(client, ref, ("linux", "amd64"))
            lowers = imageref.overlaybd_lowers(manifest, where, turbo_ok=True)
            if want is None:          # erofs below, and the layer above has no erofs.fs.meta
                with pytest.raises(Exception, match="has no erofs.fs.meta, which the layers below use"):
                    turbometa.resolve(client, ref, lowers, str(tmp_path / tag), erofs_ok=erofs_ok)
                continue
            got = turbometa.resolve(client, ref, lowers, str(tmp_path / tag), erofs_ok=erofs_ok)
        assert [os.path.basename(low["file"]) for low in got] == want


@pytest.mark.parametrize("members,what", [
    ([("../evil", b"x"), ("ext4.fs.meta", b"m")], "member '../evil'"),
    ([("ext4.fs.meta", Special(tarfile.SYMTYPE))], "member 'ext4.fs.meta' (type"),
    ([(".turbo.ociv1", b"")], "has no ext4.fs.meta or erofs.fs.meta"),
    ([("ext4.fs.meta", b"a"), ("ext4.fs.meta", b"b")], "has 'ext4.fs.meta' twice"),
    (None, "cannot open the TurboOCI meta archive"),
])
def test_turbometa_refuses_a_bad_meta_archive(reg, env, tmp_path, members, what):
    data = meta_archive(members) if members else b"\x1f\x8b not really gzip at all"
    tag = f"bad{abs(hash(what)) % 10000}"
    push_image(reg, "t/bad", tag, [(data, b"orig", TAR)])
    root = tmp_path / "layers"
    r = tool("image-config", f"{reg.url.split('://', 1)[1]}/t/bad:{tag}", tmp_path / "c.json",
             "--dir-root", root, check=False, env=env)
    assert r.returncode != 0 and what.encode() in r.stderr, r.stderr
    assert not (tmp_path / "c.json").exists()
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
