"""`tcmu-obd attach --iscsi` inside the qemu guest: the daemon's backstore
exported as an LIO iSCSI target on 127.0.0.1 (iscsi_target_mod), the kernel
initiator logged in through open-iscsi (iscsid + iscsiadm), reads through the
resulting /dev/sdX that match Image.read, `list`, and a detach that logs out
and leaves no target, session or node record behind.

The guest's loopback interface starts DOWN (there is no network set-up in the
tcmuvm init), so the module fixture brings `lo` up, creates /run/lock (the
guest's /run is an empty tmpfs; iscsiadm needs /run/lock/iscsi) and starts
`iscsid -f`.
Skipped when open-iscsi is not installed (scripts/setup.sh installs it)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/sys/module/target_core_user"),
                       reason="needs target_core_user (runs in the qemu guest)"),
    pytest.mark.skipif(not shutil.which("iscsiadm") or not shutil.which("iscsid"),
                       reason="open-iscsi is not installed (scripts/setup.sh installs it)"),
]

from tcmu_obd.serve import attach as att  # noqa: E402
from tcmu_obd.serve import iscsi  # noqa: E402
from tcmu_obd.image import assemble, baselayer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tcmu_handler import pread_direct, running_daemon, sh, write_config  # noqa: E402

PY = os.environ.get("TCMUVM_PYTHON", sys.executable)
MiB = 1 << 20


def _iscsid_listening():
    try:
        return "ISCSIADM_ABSTRACT_NAMESPACE" in Path("/proc/net/unix").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def iscsid():
    sh("ip link set lo up")
    os.makedirs("/run/lock", exist_ok=True)     # iscsiadm locks in /run/lock/iscsi (tmpfs /run)
    proc = None
    if not _iscsid_listening():
        # its own session: on SIGTERM iscsid signals its whole process group
        proc = subprocess.Popen(["iscsid", "-f"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while not _iscsid_listening():
            assert proc.poll() is None, f"iscsid exited {proc.returncode}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "iscsid did not start listening"
            time.sleep(0.05)
    yield
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def idaemon(configfs, iscsid, tmp_path_factory):
    """The daemon; requested after iscsid so that it stops first."""
    with running_daemon(tmp_path_factory.mktemp("tcmu-iscsi")) as d:
        yield d


def _no_trace(dev_id):
    iqn = iscsi.iqn_for(dev_id)
    assert not os.path.exists(f"{att.ISCSI}/{iqn}"), os.listdir(att.ISCSI)
    assert not os.path.exists(att.core_dir(dev_id))
    assert not iscsi.session_of(iqn)
    nodes = sh("iscsiadm -m node", check=False)
    assert iqn not in nodes.stdout, nodes.stdout


def test_attach_iscsi_reads_and_detaches(idaemon):
    cfg = write_config(idaemon.dir / "iscsi.json", [baselayer.path()])
    r = sh(f"{PY} -m tcmu_obd.cli.serve attach {cfg} --iscsi --dev-id 301")
    dev = r.stdout.strip()
    assert dev.startswith("/dev/sd"), r
    name = os.path.basename(dev)
    iqn = iscsi.iqn_for("301")
    # a disk of the iSCSI initiator, not of tcm_loop
    devpath = os.path.realpath(f"/sys/block/{name}/device")
    assert "/session" in devpath, devpath
    assert not os.path.exists(f"{att.LOOPBACK}/{att.naa_for('301')}")
    tpg = f"{att.ISCSI}/{iqn}/tpgt_1"
    assert Path(f"{tpg}/enable").read_text().strip() == "1"
    assert Path(f"{tpg}/attrib/generate_node_acls").read_text().strip() == "1"
    assert Path(f"{tpg}/attrib/authentication").read_text().strip() == "0"
    assert os.listdir(f"{tpg}/np") == ["127.0.0.1:3260"]
    assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
    info = Path(f"{att.core_dir('301')}/info").read_text()
    m = re.search(r"CmdRingSizeMB: (\d+)", info)      # attach asks for a 1 MiB command ring
    assert m is None or m.group(1) == str(att.CMD_RING_SIZE_MB), info
    max_kb = Path(f"/sys/block/{name}/queue/max_sectors_kb").read_text().strip()
    image = assemble.open_image(cfg)
    try:
        assert int(Path(f"/sys/block/{name}/size").read_text()) * 512 == image.virtual_size
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            head = pread_direct(fd, 0, 4096)
            assert head[1080:1082] == b"\x53\xef", head[1080:1082]     # ext4 magic
            for off in range(0, 4 * MiB, MiB):
                assert pread_direct(fd, off, MiB) == image.read(off, MiB), off
            for off in (1 << 30, image.virtual_size - MiB):
                assert pread_direct(fd, off, MiB) == image.read(off, MiB), off
        finally:
            os.close(fd)
    finally:
        image.close()
    listed = json.loads(sh(f"{PY} -m tcmu_obd.cli.serve list --json").stdout)
    mine = [d for d in listed if d["dev_id"] == "301"]
    assert mine and mine[0]["disk"] == dev and mine[0]["fabric"] == "iscsi", listed
    assert mine[0]["portal"] == "127.0.0.1:3260" and mine[0]["target"] == iqn
    text = sh(f"{PY} -m tcmu_obd.cli.serve list").stdout
    assert "iscsi 127.0.0.1:3260" in text and dev in text, text
    print(f"iSCSI disk {dev}: max_sectors_kb={max_kb}; {m.group(0) if m else info.strip()}")
    sh(f"{PY} -m tcmu_obd.cli.serve detach {dev}")
    _no_trace("301")
    assert not os.path.exists(dev) or not os.path.exists(f"/sys/block/{name}")


def test_two_iscsi_devices_share_the_portal(idaemon):
    cfg = write_config(idaemon.dir / "iscsi2.json", [baselayer.path()])
    dev_a = att.attach(cfg, "302", iscsi=True)
    try:
        dev_b = att.attach(cfg, "303", iscsi=True)
        try:
            assert dev_a != dev_b
            for dev_id in ("302", "303"):
                np = os.listdir(f"{att.ISCSI}/{iscsi.iqn_for(dev_id)}/tpgt_1/np")
                assert np == ["127.0.0.1:3260"], np
            want = assemble.open_image(cfg).read(0, 65536)
            for dev in (dev_a, dev_b):
                fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
                try:
                    assert pread_direct(fd, 0, 65536) == want
                finally:
                    os.close(fd)
            assert att._id_of_disk(dev_b) == "303"
        finally:
            att.detach("303")
        _no_trace("303")
        # the other target still serves after its neighbour went away
        fd = os.open(dev_a, os.O_RDONLY | os.O_DIRECT)
        try:
            assert pread_direct(fd, 1024, 512)[56:58] == b"\x53\xef"
        finally:
            os.close(fd)
    finally:
        att.detach("302")
    _no_trace("302")
