"""targetcli drives the daemon through D-Bus (inside the qemu guest): with a
system bus and no tcmu-runner, `tcmu-obd serve` is org.kernel.TCMUService1,
so `/backstores/user:overlaybd create` checks the cfgstring (CheckConfig) and
the kernel's add reaches our handler.  Skipped without targetcli or
dbus-daemon (apt-get install targetcli-fb dbus)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcmu_obd.image import baselayer

PY = os.environ.get("TCMUVM_PYTHON", sys.executable)
pytestmark = pytest.mark.skipif(not (shutil.which("targetcli") and shutil.which("dbus-daemon")),
                                reason="needs targetcli-fb and dbus")


def tcli(*args, check=True):
    r = subprocess.run(["targetcli", *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise AssertionError(f"targetcli {' '.join(args)}: {r.stdout}{r.stderr}")
    return r.stdout + r.stderr


@pytest.fixture
def bus_and_daemon(configfs, tmp_path):
    os.makedirs("/run/dbus", exist_ok=True)
    os.makedirs("/etc/target", exist_ok=True)
    bus = subprocess.run(["dbus-daemon", "--system", "--fork", "--print-pid"],
                         capture_output=True, text=True, check=True)
    bus_pid = int(bus.stdout.split()[0])
    svc = tmp_path / "overlaybd.json"
    svc.write_text(json.dumps({"logConfig": {"logPath": str(tmp_path / "log"), "logLevel": 0},
                               "enableAudit": False}))
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen([PY, "-m", "tcmu_obd.cli.serve", "serve", str(svc), "--dbus", "yes",
                             "--pid-file", str(pid_file)], stdout=subprocess.DEVNULL)
    log = tmp_path / "log"
    deadline = time.monotonic() + 240
    while not (log.exists() and "serving org.kernel.TCMUService1" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, \
            log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    yield tmp_path
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    os.kill(bus_pid, signal.SIGTERM)


def test_targetcli_create_and_export(bus_and_daemon):
    tmp = bus_and_daemon
    cfg = tmp / "img.json"
    cfg.write_text(json.dumps({"lowers": [{"file": baselayer.path()}],
                               "resultFile": str(tmp / "result")}))
    assert "user:overlaybd" in tcli("ls", "/backstores")
    out = tcli("/backstores/user:overlaybd", "create", "name=obd0", "size=64G",
               "cfgstring=/no/such/config.json", check=False)
    assert "cfgstring invalid" in out
    tcli("/backstores/user:overlaybd", "create", "name=obd0", "size=64G", f"cfgstring={cfg}")
    assert (tmp / "result").read_text() == "success"
    naa = "naa.5001405aabbccdd0"
    tcli("/loopback", "create", naa)
    try:
        tcli(f"/loopback/{naa}/luns", "create", "/backstores/user:overlaybd/obd0")
        deadline = time.monotonic() + 60
        disks = []
        while not disks and time.monotonic() < deadline:
            disks = [d for d in Path("/sys/block").glob("sd*")
                     if (d / "device/model").read_text().startswith("TCMU device")
                     and int((d / "size").read_text()) == (64 << 30) // 512]
            time.sleep(0.1)
        assert disks
        with open(f"/dev/{disks[0].name}", "rb") as f:
            f.seek(1024 + 56)
            assert f.read(2) == b"\x53\xef"          # the base layer's ext4 magic
    finally:
        tcli("/loopback", "delete", naa)
        tcli("/backstores/user:overlaybd", "delete", "obd0")
