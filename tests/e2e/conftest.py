"""The end-to-end suite's fixtures: the real container client driving tcmu-obd,
INSIDE the tcmuvm guest (tests/vm/README.md).  tests/test_e2e_guest.py (marker
`e2e`) builds the client once (scripts/build-e2e.sh) and boots one VM that runs

    $TCMUVM_PYTHON -m pytest -q -p no:cacheprovider tests/e2e

with TCMU_OBD_E2E_BIN = the build's cache dir.  On the host tests/conftest.py keeps
this directory out of collection.  This is not a general containerd
harness: it starts exactly the stack the cases need, once per session.

The `stack` fixture (session) brings up, in the guest:
* `lo`, cgroup2 on /sys/fs/cgroup, a tmpfs on /var/lib/containerd (overlayfs
  cannot use the guest's overlay root as its upper dir);
* `tcmu-obd install` on the guest's root (its tmpfs overlay), so
  /opt/overlaybd/bin and /etc/overlaybd/overlaybd.json are where the
  snapshotter looks, then `tcmu-obd serve` (the overlaybd-tcmu daemon);
* a registry on 127.0.0.1 (tests/registry_server.py), a small busybox image
  pushed to it as plain OCI (two layers, the second with data files and a
  whiteout) and that image converted by `tcmu-obd convert`;
* accelerated-container-image's overlaybd-snapshotter with
  /etc/overlaybd-snapshotter/config.json (the registry as an insecure mirror),
  and containerd 2 with the snapshotter as proxy plugin `overlaybd`.

Stack has ctr() (aci's ctr: containerd's commands plus rpull/record-trace),
run() (ctr run --rm, returns the container's stdout), the expected files
(EXPECTED: path in the container -> sha256), restart_snapshotter(**config),
restart_daemon(), devices() (the overlaybd TCMU backstores in configfs) and
logs() for failure messages.

Progress: each test prints `@@e2e start <test>` and `@@e2e done <test> <s>`,
the session set-up `@@e2e done setup <s>`, so the host test can report the
time of each case and which one was running when a guest ran out of time.
"""
import os
import sys
import time
from pathlib import Path

import pytest

IN_GUEST = os.environ.get("TCMUVM_GUEST") == "1"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if not IN_GUEST:
    collect_ignore_glob = ["test_*.py"]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from e2e_stack import Stack, guest_setup, push_oci_image, busybox_layers, sh  # noqa: E402
from guest_suite import GuestSuite  # noqa: E402

SUITE = GuestSuite("e2e", HERE, IN_GUEST,
                   "runs in the tcmuvm guest: python -m pytest -m e2e tests/test_e2e_guest.py")


def pytest_configure(config):
    SUITE.configure(config)


def progress(text):
    """One `@@e2e` line on the console, flushed at once (the guest may be killed next)."""
    SUITE.line(text)


def pytest_runtest_logstart(nodeid, location):
    SUITE.logstart(nodeid)


def pytest_runtest_logfinish(nodeid, location):
    SUITE.logfinish(nodeid)


def pytest_collection_modifyitems(config, items):
    SUITE.skip_outside_guest(items)


@pytest.fixture(scope="session")
def stack():
    if not IN_GUEST:
        pytest.skip("runs in the tcmuvm guest")
    bindir = os.environ.get("TCMU_OBD_E2E_BIN")
    if not bindir:
        pytest.fail("TCMU_OBD_E2E_BIN is not set (tests/test_e2e_guest.py sets it to scripts/build-e2e.sh's dir)")
    sys.path.insert(0, str(REPO / "tests"))
    import registry_server
    t0 = time.monotonic()
    s = Stack(bindir)
    try:
        guest_setup()
        sh(sys.executable, "-m", "tcmu_obd", "install")
        s.start_daemon()
        s.reg = registry_server.Registry(start_timeout=120).__enter__()
        s.reg.host = f"127.0.0.1:{s.reg.port}"
        src = push_oci_image(s.reg, "src/busybox", "v1", busybox_layers())
        s.image = f"{s.reg.host}/obd/busybox:v1"
        sh(sys.executable, "-m", "tcmu_obd", "convert", src, s.image, timeout=600)
        s.start_snapshotter()
        s.start_containerd()
    except BaseException:
        print(s.logs(), file=sys.stderr)
        s.close()
        raise
    progress(f"done setup {time.monotonic() - t0:.1f}")
    yield s
    s.close()


@pytest.fixture(scope="session")
def pulled(stack):
    """The tcmu-obd-converted image, rpulled once."""
    stack.rpull(stack.image)
    return stack.image


