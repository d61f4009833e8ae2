"""Runs in the tcmuvm guest: is the environment the TCMU tests need there?"""
import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SECTOR = 512


def sh(*args, **kw):
    kw.setdefault("check", True)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    kw.setdefault("text", True)
    return subprocess.run(args, **kw)


def test_host_python_runs_the_tests():
    assert os.environ.get("TCMUVM_PYTHON") == sys.executable
    assert Path.cwd() == Path(os.environ["TCMUVM_WORK"])


@pytest.mark.parametrize("module", ["configfs", "target_core_mod", "target_core_user", "uio",
                                    "tcm_loop", "scsi_mod", "sd_mod", "sg", "loop", "9p", "overlay"])
def test_module_loaded(module):
    assert Path("/sys/module", module).is_dir(), f"{module} is not loaded"


def test_configfs_target(configfs):
    assert (configfs / "core").is_dir()
    assert "Target Engine Core" in (configfs / "version").read_text()


def test_module_tree_for_kmod():
    """tcmu-runner and kmod need a depmod'ed /lib/modules/$(uname -r)."""
    assert Path("/lib/modules", os.uname().release, "modules.dep.bin").is_file()


def test_request_module_forwarder():
    """modprobe via the bound module tree (what request_module() ends up running)."""
    sh("modprobe", "crc32c_generic")
    assert Path("/sys/module/crc32c_generic").is_dir()


def test_project_imports():
    import tcmu_obd
    import tcmu_obd.core._lsmt
    repo = Path(os.environ["TCMUVM_WORK"])
    assert Path(tcmu_obd.__file__).resolve().is_relative_to(repo)
    assert Path(tcmu_obd.core._lsmt.__file__).suffix == ".so"


def test_bundled_base_layer_reads():
    from tcmu_obd.image import baselayer
    from tcmu_obd.image.stack import Image
    from tcmu_obd.image.layer import open_layer

    assert os.path.getsize(baselayer.path()) == baselayer.SIZE
    image = Image([open_layer(baselayer.path())])
    try:
        assert image.virtual_size == 64 << 30
        assert image.pread(1080, 2) == b"\x53\xef"     # ext4 superblock magic
    finally:
        image.close()


def test_libtcmu_loads():
    lib = ctypes.CDLL("libtcmu.so.2")
    assert lib.tcmulib_initialize and lib.tcmulib_get_master_fd


def test_loop_device_and_ext4(tmp_path):
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    dev = sh("losetup", "-f", "--show", str(img)).stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        # lazy init: fewer BLKZEROOUTs, which a loop on tmpfs logs as unsupported
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev)
        sh("mount", "-t", "ext4", dev, str(mnt))        # ext4 loads through the forwarder
        try:
            (mnt / "hello").write_bytes(b"x" * 100000)
            os.sync()
        finally:
            sh("umount", str(mnt))
        sh("mount", "-t", "ext4", "-o", "ro", dev, str(mnt))
        try:
            assert (mnt / "hello").read_bytes() == b"x" * 100000
        finally:
            sh("umount", str(mnt))
    finally:
        sh("losetup", "-d", dev)


@pytest.fixture
def tcmu_runner(tmp_path, wait_for):
    """tcmu-runner with only its qcow handler; yields once its netlink loop is up."""
    exe = shutil.which("tcmu-runner")
    if exe is None:
        pytest.fail("tcmu-runner is missing: run scripts/setup.sh")
    src = Path("/usr/lib/x86_64-linux-gnu/tcmu-runner/handler_qcow.so")
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / src.name).symlink_to(src)   # skips rbd/zbc/fbo: librados alone costs seconds under TCG
    logdir = tmp_path / "log"
    logdir.mkdir()
    proc = subprocess.Popen([exe, "-d", "--handler-path", str(handlers), "-l", str(logdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = logdir / "tcmu-runner.log"

    def ready():
        assert proc.poll() is None, f"tcmu-runner exited {proc.returncode}"
        return log.exists() and "Inotify is watching" in log.read_text(errors="replace")
    try:
        wait_for(ready, 60, what="tcmu-runner to start")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log.exists():
            print(log.read_text(errors="replace")[-3000:])


def test_tcmu_lun_round_trip(tcmu_runner, tcmu_lun, tmp_path):
    """The conftest fixtures end to end, with tcmu-runner's qcow handler serving a raw file:
    user backstore -> tcm_loop -> /dev/sdX, read and write."""
    size = 8 << 20
    backing = tmp_path / "backing.img"
    pattern = hashlib.sha256(b"tcmuvm").digest() * (size // 32)
    backing.write_bytes(pattern)                     # raw: qcow accepts it when size == dev_size
    lun = tcmu_lun("qcow", str(backing), size, timeout=90)
    assert lun.sectors * SECTOR == size
    assert lun.hctl.endswith(":0:1:0") and lun.sg and lun.backstore.uio()
    m = mmap.mmap(-1, 1 << 20)                       # page-aligned, as O_DIRECT needs
    fd = os.open(lun.dev, os.O_RDWR | os.O_DIRECT)
    try:
        got = hashlib.sha256()
        for off in range(0, size, 1 << 20):
            assert os.preadv(fd, [m], off) == 1 << 20
            got.update(m)
        assert got.digest() == hashlib.sha256(pattern).digest()
        m[:] = b"\xa5" * (1 << 20)
        assert os.pwritev(fd, [m], 3 << 20) == 1 << 20
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(backing, "rb") as f:
        f.seek(3 << 20)
        assert f.read(1 << 20) == b"\xa5" * (1 << 20)
