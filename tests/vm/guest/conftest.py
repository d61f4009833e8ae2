"""Fixtures for tests that run INSIDE the tcmuvm guest (tests/vm/README.md).

The files in this directory are collected only in the guest (TCMUVM_GUEST=1,
set by tests/vm/run.py); on the host, tests/test_vm_guest.py boots one VM that
runs them all:

    $TCMUVM_PYTHON -m pytest -q -p no:cacheprovider tests/vm/guest

Give test files here names that are unique in the whole tests/ tree (there is
no __init__.py).  Everything written outside the repository (the overlay root,
/tmp, /run, configfs) disappears with the guest; the repository is the host's,
shared read-write.

Fixtures
--------
configfs (session)
    Path("/sys/kernel/config/target").  Fails when configfs or target_core_mod
    is missing.

wait_for
    wait_for(predicate, timeout=60.0, interval=0.05, what="...") polls
    predicate() until it returns something truthy and returns that; raises
    TimeoutError naming `what` after `timeout` seconds.  Use it for every wait
    on the kernel (TCG is 10-50x slower than the host and its speed swings).

target
    A TargetTree for the test; everything it creates is torn down after the
    test, in reverse order of creation (LUN link, lun dir, TPG and its nexus,
    the loopback WWN, then the backstore and its HBA dir).  Its methods are
    also fixtures of their own:

tcmu_backstore
    tcmu_backstore(subtype, cfgstring, size, *, block_size=512, name=None,
                   nl_reply_supported=None, control=(), attrib=None,
                   serial=None, enable=True) -> Backstore
    mkdir core/user_<N>/<name>; writes control `dev_config=<subtype>/<cfgstring>`,
    `dev_size=`, `hw_block_size=` (then `nl_reply_supported=` and the extra
    `control` strings, e.g. "max_data_area_mb=8"), `attrib/<k>` values (e.g.
    {"cmd_time_out": 10}), `wwn/vpd_unit_serial`, and finally `enable` = 1.
    Backstore has .path (its configfs dir), .hba ("user_0"), .name, .subtype,
    .cfgstring, .size, .block_size, and .uio() -> "/dev/uioN" once enabled.

tcm_loop_lun
    tcm_loop_lun(backstore, timeout=60.0) -> Lun
    Exports the backstore through a fresh tcm_loop WWN: loopback/<naa>/tpgt_1,
    `nexus` (this creates the SCSI host), lun/lun_0 and the symlink to the
    backstore; then polls (bounded by `timeout`) until sd has attached:
    /sys/class/scsi_device/<H:0:1:0>/device/block/<sdX>, /dev/sdX exists and
    the disk has a non-zero size.  Lun has .dev ("/dev/sda"), .name ("sda"),
    .hctl ("0:0:1:0"), .sg ("/dev/sg0" or None), .sectors (512-byte units),
    .wwn, .tpg (configfs dir) and .backstore.

tcmu_lun
    tcmu_lun(subtype, cfgstring, size, *, timeout=60.0, **backstore_kwargs)
    -> Lun: both of the above.

Progress lines
--------------
Each test's start and end go to the console as `@@tcmuvm start <nodeid>` and
`@@tcmuvm done <nodeid> <seconds>s`, so that when the host kills a guest that
ran out of time, tests/vm/run.py (progress_report) can say which test was
running and how long each finished one took.

Rules the kernel imposes (see also tests/vm/README.md, pitfalls):
* Start the user-space handler and wait until it is READY before creating the
  backstore: `enable` = 1 blocks until the handler answers the netlink "add"
  event.  If no handler listens and a libtcmu user has switched netlink replies
  on, the write hangs in D state; nl_reply_supported=-1 makes the kernel not
  wait (then the handler must pick the device up by itself).
* Tear down in this order: LUN, backstore, THEN stop the handler.  With pytest
  fixtures that means: request the handler fixture before `target` /
  `tcmu_lun` in the test's arguments (or make it depend on nothing the target
  needs), so that pytest finalizes it last.
* Never write configfs from the handler's own libtcmu event thread.
* /sys/block/sdX/device/model is space-padded; use .hctl (from tpgt_1/address)
  to find devices, as these fixtures do.
"""
import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

IN_GUEST = os.environ.get("TCMUVM_GUEST") == "1"
if not IN_GUEST:
    # These tests need the guest's kernel; on the host, tests/test_vm_guest.py runs them.
    collect_ignore_glob = ["test_*.py"]

CONFIGFS = Path("/sys/kernel/config/target")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))       # tests/, for guest_suite

from guest_suite import GuestSuite  # noqa: E402


SUITE = GuestSuite("tcmuvm", HERE, IN_GUEST,
                   "runs in the tcmuvm guest: python tests/vm/run.py -- "
                   "'$TCMUVM_PYTHON -m pytest -q tests/vm/guest'", unit="s")


def pytest_configure(config):
    SUITE.configure(config)


def pytest_runtest_logstart(nodeid, location):
    SUITE.logstart(nodeid)


def pytest_runtest_logfinish(nodeid, location):
    SUITE.logfinish(nodeid)


def pytest_collection_modifyitems(config, items):
    SUITE.skip_outside_guest(items)


def _wait_for(predicate, timeout=60.0, interval=0.05, what="a condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)


def _write(path, value):
    """One write(2) of the whole value, as `echo -n` does (configfs wants that)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


@dataclass
class Backstore:
    path: Path
    hba: str
    name: str
    subtype: str
    cfgstring: str
    size: int
    block_size: int

    def uio(self):
        """/dev/uioN of this device: its uio name is tcm-user/<hba#>/<name>/<subtype>/<cfg>."""
        for d in Path("/sys/class/uio").glob("uio*"):
            try:
                parts = (d / "name").read_text().strip().split("/")
            except OSError:
                continue
            if parts[:3] == ["tcm-user", self.hba.split("_")[1], self.name]:
                return f"/dev/{d.name}"
        return None


@dataclass
class Lun:
    backstore: Backstore
    wwn: Path
    tpg: Path
    hctl: str
    name: str
    sg: Optional[str]
    sectors: int
    dev: str = field(init=False)

    def __post_init__(self):
        self.dev = f"/dev/{self.name}"


class TargetTree:
    """Creates TCMU backstores and tcm_loop LUNs and removes them in reverse order."""

    _ids = itertools.count(1)

    def __init__(self, root=CONFIGFS):
        self.root = Path(root)
        self._undo = []          # (description, callable), run last-in first-out

    # -- backstores -------------------------------------------------------
    def _free_hba(self):
        used = {p.name for p in (self.root / "core").glob("user_*")}
        return next(f"user_{i}" for i in itertools.count() if f"user_{i}" not in used)

    def tcmu_backstore(self, subtype, cfgstring, size, *, block_size=512, name=None,
                       nl_reply_supported=None, control=(), attrib=None, serial=None, enable=True):
        n = next(self._ids)
        hba = self._free_hba()
        name = name or f"disk{n}"
        hba_dir = self.root / "core" / hba
        path = hba_dir / name
        hba_dir.mkdir()
        self._undo.append((f"rmdir {hba_dir}", hba_dir.rmdir))
        path.mkdir()
        self._undo.append((f"rmdir {path}", path.rmdir))
        _write(path / "control", f"dev_config={subtype}/{cfgstring}")
        _write(path / "control", f"dev_size={size}")
        _write(path / "control", f"hw_block_size={block_size}")
        if nl_reply_supported is not None:
            _write(path / "control", f"nl_reply_supported={nl_reply_supported}")
        for c in control:
            _write(path / "control", c)
        for k, v in (attrib or {}).items():
            _write(path / "attrib" / k, v)
        if serial is not None:
            _write(path / "wwn" / "vpd_unit_serial", serial)
        if enable:
            _write(path / "enable", 1)   # blocks until the handler has answered
        return Backstore(path, hba, name, subtype, cfgstring, size, block_size)

    # -- tcm_loop ---------------------------------------------------------
    def _free_naa(self):
        while True:
            n = next(self._ids)
            wwn = self.root / "loopback" / f"naa.50014050000{n:05x}"
            if not wwn.exists():
                return wwn, f"naa.50014051000{n:05x}"

    def tcm_loop_lun(self, backstore, timeout=60.0):
        wwn, initiator = self._free_naa()
        tpg = wwn / "tpgt_1"
        wwn.mkdir(parents=True)          # parents: the fabric dir appears on first use
        self._undo.append((f"rmdir {wwn}", wwn.rmdir))
        tpg.mkdir()
        self._undo.append((f"rmdir {tpg}", tpg.rmdir))      # also drops the nexus / SCSI host
        _write(tpg / "nexus", initiator)
        lun_dir = tpg / "lun" / "lun_0"
        lun_dir.mkdir()
        self._undo.append((f"rmdir {lun_dir}", lun_dir.rmdir))
        link = lun_dir / backstore.name
        link.symlink_to(backstore.path)
        self._undo.append((f"rm {link}", link.unlink))
        hctl = (tpg / "address").read_text().strip() + ":0"    # "H:0:T" + LUN 0
        sdev = Path("/sys/class/scsi_device") / hctl / "device"

        def attached():
            disks = list((sdev / "block").glob("sd*")) if (sdev / "block").is_dir() else []
            if not disks:
                return None
            name = disks[0].name
            try:
                sectors = int(Path(f"/sys/block/{name}/size").read_text())
            except (OSError, ValueError):
                return None
            return (name, sectors) if sectors and os.path.exists(f"/dev/{name}") else None

        name, sectors = _wait_for(attached, timeout, what=f"sd to attach {hctl} ({backstore.path})")
        sgs = list((sdev / "scsi_generic").glob("sg*")) if (sdev / "scsi_generic").is_dir() else []
        sg = f"/dev/{sgs[0].name}" if sgs else None
        return Lun(backstore, wwn, tpg, hctl, name, sg, sectors)

    def tcmu_lun(self, subtype, cfgstring, size, *, timeout=60.0, **backstore_kwargs):
        bs = self.tcmu_backstore(subtype, cfgstring, size, **backstore_kwargs)
        return self.tcm_loop_lun(bs, timeout=timeout)

    # -- teardown ---------------------------------------------------------
    def cleanup(self):
        errors = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except FileNotFoundError:
                pass                     # already removed by the test
            except OSError as e:
                errors.append(f"{what}: {e}")
        if errors:
            raise RuntimeError("target teardown failed:\n" + "\n".join(errors))


@pytest.fixture(scope="session")
def configfs():
    if not CONFIGFS.is_dir():
        pytest.fail(f"{CONFIGFS} is missing: not in a tcmuvm guest, or target_core_mod/configfs "
                    "did not load (see the guest console)")
    return CONFIGFS


@pytest.fixture
def wait_for():
    return _wait_for


@pytest.fixture
def target(configfs):
    tree = TargetTree(configfs)
    yield tree
    tree.cleanup()


@pytest.fixture
def tcmu_backstore(target):
    return target.tcmu_backstore


@pytest.fixture
def tcm_loop_lun(target):
    return target.tcm_loop_lun


@pytest.fixture
def tcmu_lun(target):
    return target.tcmu_lun
