"""containerd 2 + accelerated-container-image's overlaybd-snapshotter driving
tcmu-obd (the overlaybd-tcmu daemon and tools), in the guest: rpull + run of a
tcmu-obd-converted image, the three rwModes, the daemon killed under a running
container, commit of a writable layer, overlaybd-attacher, a non-default
tenant, and teardown on image removal.  The cases share one stack (conftest)
and run in file order; the ones that restart the snapshotter or remove the
image come last.  Not a test of containerd or the snapshotter themselves.
"""
import signal
from pathlib import Path

import pytest

from e2e_stack import EXPECTED, SNAP_ROOT, WRITABLE, checksum_script, parse_sums, wait_for


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
    out = stack.run(pulled, f"b-{mode}-again", checksum_script() + "; test -e /data/copy && echo LEAK",
                    labels=labels)
    assert parse_sums(out) == EXPECTED and "LEAK" not in out


def test_daemon_sigkill_restart_under_a_running_container(stack, pulled):
    """(d) SIGKILL tcmu-obd serve while a container runs on its device; after a restart reads go on."""
    stack.ctr("run", "-d", "--snapshotter", "overlaybd", pulled, "d-long", "sleep", "100000")
    try:
        out = stack.ctr("task", "exec", "--exec-id", "e1", "d-long", "sh", "-c", checksum_script()).stdout
        assert parse_sums(out) == EXPECTED
        before = stack.devices()
        stack.restart_daemon(signal.SIGKILL)
        assert stack.devices() == before
        _drop_caches()
        out = stack.ctr("task", "exec", "--exec-id", "e2", "d-long", "sh", "-c", checksum_script()).stdout
        assert parse_sums(out) == EXPECTED, out + stack.logs()
    finally:
        stack.ctr("task", "kill", "-s", "SIGKILL", "d-long", check=False)
        wait_for(lambda: stack.ctr("task", "ls", check=False).stdout.count("d-long") == 0 or
                 "STOPPED" in stack.ctr("task", "ls", check=False).stdout, 60, "task d-long stopped")
        stack.ctr("task", "rm", "-f", "d-long", check=False)
        stack.ctr("container", "rm", "d-long", check=False)
