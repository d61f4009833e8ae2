"""The image tools on TCMU devices, inside the qemu guest: overlaybd-apply,
overlaybd-create --mkfs, `tcmu-obd convert` and `tcmu-obd run` pick the TCMU
frontend (tcmu_obd/serve/blockdev.py) where the kernel has it, with a daemon
private to the tool's process when none is running, or through the running
`tcmu-obd serve`.  The frontend is forced to tcmu here
(TCMU_OBD_FRONTEND=tcmu), so a silent fall-back to FUSE fails the test.  The
results are compared with the same model the host's FUSE tests use
(tests/test_apply_untar.py).  Skipped where target_core_user is not loaded."""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/sys/module/target_core_user"),
                                reason="needs target_core_user (runs in the qemu guest)")

TESTS = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TESTS))

import test_apply_untar as tau  # noqa: E402
import test_convert_registry as tcr  # noqa: E402
import test_tcmu_handler as th  # noqa: E402
from registry_server import Registry  # noqa: E402

from tcmu_obd.build import apply, run
from tcmu_obd.serve import attach as att, blockdev
from tcmu_obd.serve.configfs import daemon_pids
from tcmu_obd.image import baselayer  # noqa: E402

MiB = 1 << 20


@pytest.fixture(autouse=True)
def tcmu_only(configfs, monkeypatch):
    monkeypatch.setenv(blockdev.FRONTEND_ENV, "tcmu")
    assert not daemon_pids(), "a daemon from another test is still running"
    yield
    hba = f"{att.CORE}/user_{att.HBA}"
    left = os.listdir(hba) if os.path.isdir(hba) else []
    assert not [n for n in left if n.startswith("dev_")], f"devices left attached: {left}"


def test_tools_apply_and_mkfs_through_a_private_daemon(tmp_path):
    """No daemon running: the three-layer apply of the host test (library,
    CLI on stdin, CLI from a FIFO) and the read-only mount all run through a
    TCMU daemon inside the tool's own process; then create --mkfs."""
    (tmp_path / "three").mkdir()
    tau.test_three_layers_match_the_model(tmp_path / "three")
    tmp = tmp_path / "mkfs"
    tmp.mkdir()
    cfg, data, index = tau.new_image(str(tmp), vsize=64 * MiB)
    os.unlink(data)
    os.unlink(index)
    subprocess.run([sys.executable, "-m", "tcmu_obd.cli.create", "--mkfs", data, index, "1"],
                   check=True, capture_output=True, timeout=300)
    entries = [tau.E("hello", tau.R, b"world")]
    tar = tmp / "l.tar"
    tar.write_bytes(tau.tar_bytes(entries))
    seen = {}
    real_mkfs = apply.mkfs

    def mkfs_and_look(dev):
        # a private daemon's device gives up on stuck commands (its tool may be killed)
        seen["timeout"] = open(f"/sys/block/{os.path.basename(dev)}/device/timeout").read().strip()
        real_mkfs(dev)
    apply.mkfs = mkfs_and_look
    try:
        res = apply.apply_layer(str(tar), cfg, mkfs_first=True)
    finally:
        apply.mkfs = real_mkfs
    assert seen["timeout"] == str(blockdev.PRIVATE_CMD_TIME_OUT)
    assert res.frontend.startswith("tcmu (/dev/sd") and "in this process" in res.frontend
    model = tau.Model()
    model.apply(entries)
    with tau.mount_ro(cfg, str(tmp)) as mnt:
        tau.compare(model, mnt)
        dev = tau.apply_dev(mnt)
        assert re.match(r"/dev/sd[a-z]+$", dev), dev       # a SCSI disk, not a loop device
        sb = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True).stdout
    assert re.search(r"Block size:\s+4096", sb) and "has_journal" not in sb, sb


def test_tools_apply_through_the_running_daemon(tmp_path):
    """With `tcmu-obd serve` running, apply attaches the config to it and never
    opens the upper itself; the layer is there when mounted again."""
    with th.running_daemon(tmp_path) as d:
        cfg, _, _ = tau.new_image(str(tmp_path), [baselayer.path()])
        entries = tau.layer1()
        tar = tmp_path / "l1.tar"
        data = tau.tar_bytes(entries)
        tar.write_bytes(data)
        p = tau.cli("--checksum", "sha256:" + hashlib.sha256(data).hexdigest(), tar, cfg)
        assert b"through tcmu (/dev/sd" in p.stderr and b"running TCMU daemon (pid" in p.stderr, p.stderr
        model = tau.Model()
        model.apply(entries)
        with tau.mount_ro(cfg, str(tmp_path)) as mnt:
            assert tau.compare(model, mnt) > 5
        assert f"serving {cfg}" in d.log()


def test_tools_convert_and_run_lazily(tmp_path):
    """A two-layer OCI image converted in the guest (each layer applied on a
    TCMU device) and run: the tree matches the model and the run fetched
    less than the image's blobs."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with Registry(start_timeout=180) as reg:
        reg.host = reg.url.split("//", 1)[1]
        l1, l2 = tau.layer1(), tau.layer2()
        tcr.push_image(reg, "src/app", "v1", [(tau.tar_bytes(l1), "gzip"), (tau.tar_bytes(l2), "none")])
        dst = f"{reg.host}/obd/app:v1"
        p = tcr.cli("convert", f"{reg.host}/src/app:v1", dst, "--db", tmp_path / "db.sqlite",
                    timeout=900)
        assert tcr.get_manifest(reg, "obd/app", "v1").status_code == 200, p.stderr
        model = tau.Model()
        model.apply(l1)
        model.apply(l2)
        with run.RunningImage(dst, service_cfg=None, cache_dir=str(tmp_path / "cache")) as img:
            assert img.device.frontend == "tcmu" and img.dev.startswith("/dev/sd")
            assert img.virtual_size == 64 << 30
            assert tau.compare(model, img.mountpoint) > 10
            fetched = img.fetched()
        assert 0 < fetched < img.image_size, (fetched, img.image_size)
