"""containerd 2 + accelerated-container-image's overlaybd-snapshotter driving
tcmu-obd (the overlaybd-tcmu daemon and tools), in the guest: rpull + run of a
tcmu-obd-converted image, the three rwModes, the daemon killed under a running
container, commit of a writable layer, overlaybd-attacher, the live-snapshot
API, a non-default tenant, and teardown on image removal.  The cases share one stack (conftest)
and run in file order; the ones that restart the snapshotter or remove the
image come last.  Not a test of containerd or the snapshotter themselves.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from e2e_stack import CONFIGFS, EXPECTED, SNAP_ROOT, WRITABLE, checksum_script, parse_sums, sh, wait_for


def _drop_caches():
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_rpull_run_reads_the_files(stack, pulled):
    """(a) ctr rpull + ctr run: every file and its checksum as converted, the whiteout applied."""
    out = stack.run(pulled, "a-read", checksum_script() + "; test -e /etc/motd && echo MOTD-PRESENT; "
                    "cat /etc/passwd")
    assert parse_sums(out) == EXPECTED, out + stack.logs()
    assert "MOTD-PRESENT" not in out
    assert "root:x:0:0" in out
    # overlayfs mode: the image's top layer is a read-only TCMU device served by tcmu-obd
    assert stack.devices(), "no overlaybd device in configfs after ctr run"
    marks = list(Path(SNAP_ROOT, "snapshots").glob("*/block/backstore_mark"))
    assert marks and all(m.read_text().startswith("/dev/sd") for m in marks), marks


@pytest.mark.parametrize("mode", ["overlayfs", "dir", "dev"])
def test_rwmode_write_and_read(stack, pulled, mode):
    """(b) a container writes and reads back in each rwMode; the image's files stay intact."""
    labels = [] if mode == "overlayfs" else [f"{WRITABLE}={mode}"]
    script = ("dd if=/data/random-2m of=/data/copy bs=64k 2>/dev/null && echo new > /data/sub/new && "
              "rm /data/small && sync && " + checksum_script(["/data/copy", "/data/random-2m",
                                                              "/data/random-300k"])
              + " && cat /data/sub/new && test ! -e /data/small && echo GONE && mount")
    out = stack.run(pulled, f"b-{mode}", script, labels=labels)
    sums = parse_sums(out)
    assert sums.get("/data/copy") == EXPECTED["/data/random-2m"], out + stack.logs()
    assert sums.get("/data/random-300k") == EXPECTED["/data/random-300k"]
    assert "new\n" in out and "GONE" in out
    root = [line for line in out.splitlines() if " on / " in line]
    assert root, out
    if mode == "overlayfs":
        assert root[0].startswith("overlay"), root
    elif mode == "dev":
        assert root[0].startswith("/dev/sd") and "ext4" in root[0], root
    # a fresh container sees the image unchanged
    out = stack.run(pulled, f"b-{mode}-again", checksum_script() + "; test -e /data/copy && echo LEAK; true",
                    labels=labels)
    assert parse_sums(out) == EXPECTED and "LEAK" not in out


def test_daemon_sigkill_restart_under_a_running_container(stack, pulled, tmp_path):
    """(d) SIGKILL tcmu-obd serve while a container runs on its device; after a restart reads go on.

    The container reads when asked through a bind-mounted control dir: `ctr task exec`
    cannot be used in the guest, whose init chroots instead of switch_root, so an
    exec'd process (setns into the container's mount namespace) lands in the initramfs."""
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    loop = ("while true; do for r in /ctl/go-*; do [ -e \"$r\" ] || continue; n=${r#/ctl/go-}; "
            "echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; "
            + checksum_script() + " > /ctl/out-$n 2>&1; echo $? > /ctl/rc-$n; rm $r; done; sleep 0.2; done")
    stack.ctr("run", "-d", "--snapshotter", "overlaybd", "--mount",
              f"type=bind,src={ctl},dst=/ctl,options=rbind:rw", pulled, "d-long", "sh", "-c", loop)

    def read(n):
        (ctl / f"go-{n}").write_text("")
        rc = wait_for(lambda: (ctl / f"rc-{n}").exists() and (ctl / f"rc-{n}").read_text().strip(),
                      300, f"the container's read {n}")
        out = (ctl / f"out-{n}").read_text()
        assert rc == "0" and parse_sums(out) == EXPECTED, out + stack.logs()

    try:
        read(1)
        before = stack.devices()
        stack.restart_daemon(signal.SIGKILL)
        assert stack.devices() == before
        _drop_caches()
        read(2)
        read(3)
    finally:
        stack.ctr("task", "kill", "-s", "SIGKILL", "d-long", check=False)
        wait_for(lambda: "RUNNING" not in stack.ctr("task", "ls", check=False).stdout, 120,
                 "task d-long stopped")
        stack.ctr("task", "rm", "-f", "d-long", check=False)
        stack.ctr("container", "rm", "d-long", check=False)


def _top_config():
    """The config.v1.json of the image's top layer: the one with the most lowers and no upper."""
    best = None
    for cfg in Path(SNAP_ROOT, "snapshots").glob("*/block/config.v1.json"):
        doc = json.loads(cfg.read_text())
        if doc.get("upper"):
            continue
        if best is None or len(doc.get("lowers", [])) > len(best[1].get("lowers", [])):
            best = (cfg, doc)
    assert best, "no read-only overlaybd config under the snapshotter's root"
    return best


def _sums_of_dir(root):
    return {p: hashlib.sha256(Path(root + p).read_bytes()).hexdigest() for p in EXPECTED}


@pytest.mark.parametrize("with_devid", [False, True], ids=["plain", "with-devid"])
def test_overlaybd_attacher(stack, pulled, tmp_path, with_devid):
    """(e) overlaybd-attacher attach/detach, the cfgstring with and without `;<dev id>`."""
    _, doc = _top_config()
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps(dict(doc, resultFile=str(tmp_path / "init-debug.log"))))
    dev_id = "4242" + ("1" if with_devid else "0")
    args = ["attach", "--id", dev_id, "--config", cfg] + (["--with-devid"] if with_devid else [])
    p = sh(stack.aci / "overlaybd-attacher", *args, timeout=300)
    dev = p.stdout.strip().splitlines()[-1]
    core = CONFIGFS / "core/user_999999999" / f"dev_{dev_id}"
    try:
        assert dev.startswith("/dev/sd"), p.stdout + p.stderr
        info = (core / "info").read_text()
        want = f"overlaybd/{cfg}" + (f";{dev_id}" if with_devid else "")
        assert want in info, info
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        sh("mount", "-o", "ro", "-t", "ext4", dev, mnt)
        try:
            assert _sums_of_dir(str(mnt)) == EXPECTED
        finally:
            sh("umount", mnt)
    finally:
        sh(stack.aci / "overlaybd-attacher", "detach", "--id", dev_id, timeout=120)
    assert not core.exists()
    assert not any(lb.endswith(dev_id) for lb in stack.loopbacks())


API = "http://127.0.0.1:9862/snapshot"
OBD_CREATE = "/opt/overlaybd/bin/overlaybd-create"


def _api(query, method="POST"):
    """(status, body) of one request to the daemon's snapshot API."""
    req = urllib.request.Request(f"{API}?{urllib.parse.urlencode(query)}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _with_service_api(stack, on):
    """Turn serviceConfig on or off in the installed overlaybd.json and restart the daemon."""
    path = Path("/etc/overlaybd/overlaybd.json")
    doc = json.loads(path.read_text())
    doc["serviceConfig"] = {"enable": on, "address": "http://127.0.0.1:9862"}
    path.write_text(json.dumps(doc, indent=1))
    stack.restart_daemon()


def test_live_snapshot_api(stack, pulled, tmp_path):
    """(j) the live-snapshot API (serviceConfig): a writable device attached as aci's
    `overlaybd-attacher --with-devid` does (aci v1.4.5 has no other caller of the API and
    its snapshotter attaches without a dev id), a new upper made by overlaybd-create and a
    new config with the old upper as top lower, then the request overlaybd's API takes.
    The file system on the device reads and writes across it; the old upper is a sealed
    layer holding what was written before; the config was renamed over, and a re-attach
    from it sees everything."""
    _with_service_api(stack, True)
    dev_id, mnt = "42430", tmp_path / "mnt"
    mnt.mkdir()
    _, doc = _top_config()
    up0 = {"data": str(tmp_path / "upper0.data"), "index": str(tmp_path / "upper0.index")}
    sh(OBD_CREATE, up0["data"], up0["index"], "64")
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps(dict(doc, upper=up0, resultFile=str(tmp_path / "init-debug.log"))))
    core = CONFIGFS / "core/user_999999999" / f"dev_{dev_id}"
    attached = mounted = False
    try:
        dev = sh(stack.aci / "overlaybd-attacher", "attach", "--id", dev_id, "--config", cfg,
                 "--with-devid", timeout=300).stdout.strip().splitlines()[-1]
        attached = True
        assert f"overlaybd/{cfg};{dev_id}" in (core / "info").read_text()
        sh("mount", "-t", "ext4", dev, mnt)
        mounted = True
        before = os.urandom(1 << 20)
        (mnt / "before").write_bytes(before)
        sh("sync")
        # the caller's part: a new upper, a config with the current upper as top lower
        up1 = {"data": str(tmp_path / "upper1.data"), "index": str(tmp_path / "upper1.index")}
        sh(OBD_CREATE, up1["data"], up1["index"], "64")
        new_doc = dict(doc, lowers=doc["lowers"] + [{"file": up0["data"]}], upper=up1,
                       resultFile=str(tmp_path / "init-debug.log"))
        new_cfg = tmp_path / "new config.json"              # a space: the query is URL-encoded
        new_cfg.write_text(json.dumps(new_doc))
        assert _api({"dev_id": dev_id}) == \
            (400, b'{"success": false, "message": "Missing dev_id or config in snapshot request"}')
        assert _api({"dev_id": "no-such-id", "config": new_cfg}) == \
            (404, b'{"success": false, "message": "Image file not found"}')
        sh("fsfreeze", "-f", mnt)           # a consistent file system in the sealed layer
        try:
            got = _api({"dev_id": dev_id, "config": new_cfg})
        finally:
            sh("fsfreeze", "-u", mnt)
        assert got == (200, b'{"success": true, "message": "Snapshot created successfully"}'), \
            got + (stack.logs(),)
        assert not new_cfg.exists() and json.loads(cfg.read_text()) == new_doc
        # the file system goes on: reads (caches dropped) and writes, now into upper1
        after = os.urandom(1 << 20)
        (mnt / "after").write_bytes(after)
        sh("sync")
        _drop_caches()
        assert (mnt / "before").read_bytes() == before and (mnt / "after").read_bytes() == after
        assert _sums_of_dir(str(mnt)) == EXPECTED
        sealed = subprocess.run([sys.executable, "-c", "import sys; from tcmu_obd.image.layer import open_layer; "
                                 "l = open_layer(sys.argv[1]); print(hex(l.trailer.flags), len(l.index))",
                                 up0["data"]], capture_output=True, text=True, timeout=120)
        assert sealed.returncode == 0 and sealed.stdout.startswith("0x6 "), sealed.stdout + sealed.stderr
        assert os.path.getsize(up1["data"]) > 1 << 20          # the new upper took the writes
        sh("umount", mnt)
        mounted = False
        sh(stack.aci / "overlaybd-attacher", "detach", "--id", dev_id, timeout=120)
        attached = False
        # re-attached from the renamed config: both files
        dev = sh(stack.aci / "overlaybd-attacher", "attach", "--id", dev_id, "--config", cfg,
                 "--with-devid", timeout=300).stdout.strip().splitlines()[-1]
        attached = True
        sh("mount", "-o", "ro", "-t", "ext4", dev, mnt)
        mounted = True
        assert (mnt / "before").read_bytes() == before and (mnt / "after").read_bytes() == after
        assert _sums_of_dir(str(mnt)) == EXPECTED
    finally:
        if mounted:
            sh("umount", mnt, check=False)
        if attached:
            sh(stack.aci / "overlaybd-attacher", "detach", "--id", dev_id, timeout=120, check=False)
        _with_service_api(stack, False)
    assert not core.exists()


def test_commit_writable_layer_seals_it(stack, pulled, tmp_path):
    """(g) a container's writable (dir) snapshot committed: sealed, then a new snapshot on it sees the change."""
    stack.ctr("run", "--snapshotter", "overlaybd", "--snapshotter-label", f"{WRITABLE}=dir", pulled,
              "g-c1", "sh", "-c", "echo changed-by-g > /data/small && rm /data/random-300k && sync")
    try:
        stack.ctr("snapshots", "--snapshotter", "overlaybd", "commit", "g-layer", "g-c1")
    finally:
        stack.ctr("container", "rm", "g-c1", check=False)
    info = json.loads(stack.ctr("snapshots", "--snapshotter", "overlaybd", "info", "g-layer").stdout)
    sealed = info["Labels"].get("containerd.io/snapshot/overlaybd.localcommitpath")
    assert sealed and sealed.endswith("overlaybd.sealed") and os.path.getsize(sealed) > 0, info
    mnt = tmp_path / "rootfs"
    mnt.mkdir()
    stack.ctr("snapshots", "--snapshotter", "overlaybd", "prepare", "g-c2", "g-layer")
    try:
        mounts = stack.ctr("snapshots", "--snapshotter", "overlaybd", "mounts", str(mnt), "g-c2").stdout
        sh("sh", "-c", mounts)
        try:
            # read in the guest: `ctr run --rootfs` on this mount fails in the guest with
            # 'exec: "sh": executable file not found' (not understood yet; see tests/e2e/README.md)
            assert (mnt / "data/small").read_text() == "changed-by-g\n"
            assert not (mnt / "data/random-300k").exists()
            assert hashlib.sha256((mnt / "data/random-2m").read_bytes()).hexdigest() == \
                EXPECTED["/data/random-2m"]
        finally:
            sh("umount", mnt)
    finally:
        stack.ctr("snapshots", "--snapshotter", "overlaybd", "rm", "g-c2", check=False)
        stack.ctr("snapshots", "--snapshotter", "overlaybd", "rm", "g-layer", check=False)


def _remove_image_and_wait(stack, image):
    stack.ctr("images", "rm", "--sync", image)
    stack.ctr("content", "prune", "references", check=False)
    return wait_for(lambda: not stack.devices() and not stack.loopbacks(), 120,
                    f"configfs empty after removing {image}: {stack.devices()} {stack.loopbacks()}")


def test_image_removal_tears_every_device_down(stack, pulled):
    """(c) removing the image detaches every device the snapshotter attached (configfs empty)."""
    assert stack.devices(), "nothing attached: the earlier cases should have left the image's device"
    _remove_image_and_wait(stack, pulled)
    assert not list(Path(SNAP_ROOT, "snapshots").glob("*/block/backstore_mark"))


def test_non_default_tenant(stack):
    """(f) tenant 7: devices under core/user_7 and loopback naa.107..., torn down on removal."""
    stack.restart_snapshotter(tenant=7)
    try:
        stack.rpull(stack.image)
        out = stack.run(stack.image, "f-read", checksum_script())
        assert parse_sums(out) == EXPECTED
        devs = stack.devices()
        assert devs and all(d.startswith("user_7/") for d in devs), devs
        assert stack.loopbacks() and all(n.startswith("naa.107") for n in stack.loopbacks()), stack.loopbacks()
        _remove_image_and_wait(stack, stack.image)
    finally:
        stack.restart_snapshotter()
