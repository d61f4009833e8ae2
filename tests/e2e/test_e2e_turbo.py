"""TurboOCI images (ext4 and erofs) run by containerd 2 and the
overlaybd-snapshotter, in the guest (after test_e2e_tools.py, on the same
stack): one built by accelerated-container-image's `convertor --turboOCI`
driving tcmu-obd's overlaybd-create/turboOCI-apply/overlaybd-commit
(installed in /opt/overlaybd/bin), one built by `tcmu-obd convert
--turboOCI`.  Each is rpulled and run; the files and checksums seen inside
the container must be the source image's, the snapshotter's config for the
top layer must name the meta layer and the original gzip layer (targetDigest,
gzipIndex), and the device must hold the asked-for filesystem.  Not a test of
the convertor, the snapshotter or tcmu-obd's TurboOCI internals (the host
suite covers those).
"""
import json
import os
import sys
from pathlib import Path

import pytest
import requests

from e2e_stack import EXPECTED, SNAP_ROOT, checksum_script, parse_sums, sh, wait_for

A = "containerd.io/snapshot/overlaybd/"
ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
MAGIC = {"erofs": (1024, b"\xe2\xe1\xf5\xe0"), "ext4": (1024 + 0x38, b"\x53\xef")}


def _need(fstype):
    """Skip an erofs case when the guest kernel cannot mount erofs (the snapshotter
    would fall back to ext4.fs.meta, which an erofs image does not have)."""
    if fstype != "erofs":
        return

    def have():
        return "\terofs\n" in Path("/proc/filesystems").read_text()
    if have():
        return
    p = sh("modprobe", "erofs", check=False)
    if not have():
        pytest.skip(f"the guest kernel {os.uname().release} has no erofs: not in /proc/filesystems, "
                    f"`modprobe erofs` exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]} "
                    "(tests/vm/prepare.py MODULE_DIRS must extract fs/erofs)")


def _manifest(stack, repo, tag):
    r = requests.get(f"{stack.reg.url}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _source_layers(stack):
    return _manifest(stack, "src/busybox", "v1")["layers"]


def _check_manifest(stack, repo, tag):
    """The pushed image is TurboOCI: every layer a meta blob pointing at the source layer."""
    layers = _manifest(stack, repo, tag)["layers"]
    src = _source_layers(stack)
    assert len(layers) == len(src), layers
    for d, s in zip(layers, src):
        ann = d.get("annotations", {})
        assert ann.get(A + "version") == "0.1.0-turbo.ociv1", d
        assert ann.get(A + "turbo-oci/target-digest") == s["digest"], d
        assert ann.get(A + "turbo-oci/target-media-type") == s["mediaType"], d


def _top_config():
    """The config.v1.json with the most lowers and no upper (the image's top layer)."""
    best = None
    for cfg in Path(SNAP_ROOT, "snapshots").glob("*/block/config.v1.json"):
        doc = json.loads(cfg.read_text())
        if doc.get("upper"):
            continue
        if best is None or len(doc.get("lowers", [])) > len(best.get("lowers", [])):
            best = doc
    return best


def _device_fstypes():
    """{device: 'erofs'|'ext4'|'?'} of every backstore_mark under the snapshotter's root."""
    out = {}
    for mark in Path(SNAP_ROOT, "snapshots").glob("*/block/backstore_mark"):
        dev = mark.read_text().strip()
        with open(dev, "rb") as f:
            head = f.read(4096)
        out[dev] = next((fs for fs, (off, magic) in MAGIC.items() if head[off:off + len(magic)] == magic), "?")
    return out


def _remove_and_wait(stack, image):
    stack.ctr("images", "rm", "--sync", image)
    wait_for(lambda: not stack.devices() and not stack.loopbacks(), 120,
             f"configfs empty after removing {image}: {stack.devices()} {stack.loopbacks()}")


def _rpull_and_run(stack, image, name, fstype):
    stack.rpull(image)
    out = stack.run(image, name, checksum_script() + "; test -e /etc/motd && echo MOTD-PRESENT; "
                    "cat /etc/passwd")
    assert parse_sums(out) == EXPECTED, out + stack.logs()
    assert "MOTD-PRESENT" not in out, out
    assert "root:x:0:0" in out, out
    doc = _top_config()
    assert doc, "no read-only overlaybd config under the snapshotter's root" + stack.logs()
    lowers = doc["lowers"]
    digests = [s["digest"] for s in _source_layers(stack)]
    assert [lo.get("targetDigest") for lo in lowers] == digests, doc
    assert all(Path(lo["file"]).name == f"{fstype}.fs.meta" for lo in lowers), doc
    assert all(lo.get("gzipIndex", "").endswith("/gzip.meta") for lo in lowers), doc   # gzip source layers
    fss = _device_fstypes()
    assert fss and set(fss.values()) == {fstype}, (fss, stack.logs())
    _remove_and_wait(stack, image)


@pytest.mark.parametrize("fstype", ["ext4", "erofs"])
def test_convertor_turbooci_with_tcmu_obd_tools(stack, tmp_path, fstype):
    """(j) the real `convertor --turboOCI` (its default --mkfs; --fstype erofs) with tcmu-obd's
    overlaybd-create --turboOCI, turboOCI-apply and overlaybd-commit --turboOCI; the result runs."""
    _need(fstype)
    host = stack.reg.host
    tag = f"aci-turbo-{fstype}"
    args = ["-r", f"{host}/src/busybox", "-i", "v1", "--turboOCI", tag, "--plain", "--oci",
            "-d", tmp_path / "conv"]
    if fstype != "ext4":
        args += ["--fstype", fstype]
    sh(stack.aci / "convertor", *args, timeout=1800, cwd=tmp_path, env=stack.env)
    _check_manifest(stack, "src/busybox", tag)
    _rpull_and_run(stack, f"{host}/src/busybox:{tag}", f"j-{fstype}", fstype)


@pytest.mark.parametrize("fstype", ["ext4", "erofs"])
def test_tcmu_obd_convert_turbooci(stack, tmp_path, fstype):
    """(k) an image made by `tcmu-obd convert --turboOCI --fstype <fs>` rpulled and run; the
    snapshotter writes the targetDigest/gzipIndex lowers and tcmu-obd serves them."""
    _need(fstype)
    host = stack.reg.host
    repo, tag = "obd-turbo/busybox", fstype
    sh(sys.executable, "-m", "tcmu_obd", "convert", f"{host}/src/busybox:v1", f"{host}/{repo}:{tag}",
       "--turboOCI", "--fstype", fstype, "--oci", "--workdir", tmp_path, timeout=900)
    _check_manifest(stack, repo, tag)
    _rpull_and_run(stack, f"{host}/{repo}:{tag}", f"k-{fstype}", fstype)
