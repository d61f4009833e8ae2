"""tcmu_obd.serve.blockdev on the host: which frontend is chosen and why.  The
host kernel has no TCMU, so 'auto' must fall back to FUSE + loop and a
forced 'tcmu' must fail naming the failed checks; the TCMU side itself is
exercised in the qemu guest (tests/vm/guest/test_tools_tcmu.py)."""
import os

import pytest

from tcmu_obd.serve import blockdev
from tcmu_obd.errors import UsageError

HAS_TCMU = os.path.isdir("/sys/module/target_core_user")


def test_blockdev_forced_fuse_is_fuse(monkeypatch):
    monkeypatch.setenv(blockdev.FRONTEND_ENV, "tcmu")
    assert blockdev.choose_frontend("fuse") == "fuse"          # the argument beats the environment


def test_blockdev_unknown_frontend_names_its_source(monkeypatch):
    monkeypatch.setenv(blockdev.FRONTEND_ENV, "nbd")
    with pytest.raises(UsageError, match=f"'nbd' \\(from {blockdev.FRONTEND_ENV}\\).*auto, tcmu, fuse"):
        blockdev.choose_frontend()
    with pytest.raises(UsageError, match="'iscsi' \\(from the argument\\)"):
        blockdev.choose_frontend("iscsi")


@pytest.mark.skipif(HAS_TCMU, reason="this kernel has TCMU")
def test_blockdev_auto_falls_back_to_fuse_without_tcmu(monkeypatch):
    monkeypatch.delenv(blockdev.FRONTEND_ENV, raising=False)
    problems = blockdev.tcmu_problems()
    assert problems and all(p and fix for p, fix in problems)
    assert blockdev.choose_frontend() == "fuse"


@pytest.mark.skipif(HAS_TCMU, reason="this kernel has TCMU")
def test_blockdev_forced_tcmu_fails_with_the_checks():
    with pytest.raises(blockdev.DeviceError) as e:
        blockdev.choose_frontend("tcmu")
    text = str(e.value)
    assert "TCMU frontend cannot work here" in text
    first_problem, first_fix = blockdev.tcmu_problems()[0]
    assert first_problem in text and first_fix in text


def test_blockdev_fuse_problems_name_a_fix(monkeypatch):
    """With the tools gone from PATH, FUSE + loop is refused with what to install."""
    if blockdev.fuse_problems():
        pytest.skip(f"FUSE + loop is not usable here: {blockdev.fuse_problems()}")
    monkeypatch.setenv("PATH", "/nonexistent")
    problems = blockdev.fuse_problems()
    assert ("no losetup", "apt-get install fuse3 mount e2fsprogs") in problems
    with pytest.raises(blockdev.DeviceError, match=r"no block device frontend works here: FUSE \+ loop: "
                                                   r"no losetup \(fix: apt-get install"):
        blockdev.choose_frontend("fuse")

