"""The FUSE + loop block path end to end, on real FUSE, loop devices and ext4
(root only): `tcmu-obd mount CONFIG DIR --loop` over the bundled base layer
plus a writable upper, ext4 writes, `tcmu-obd umount`, commit of the upper,
a read-only remount of [base, committed] with the files byte for byte,
EROFS, e2fsck, concurrent readers, unaligned I/O and hole punching through
the file, SIGTERM teardown (also while a file system on the loop device is
mounted), a daemon killed with SIGKILL, and failures leaving nothing behind.

Every test checks, and its fixture enforces, that no mount, loop device or
daemon is left over."""
import ctypes
import errno
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import commit_layer
from tcmu_obd.image import assemble, baselayer
from tcmu_obd.serve import blockdev, fuse
from tcmu_obd import service_config
from tcmu_obd.image.rw import RWLayer

GiB = 1 << 30
VSIZE = 64 * GiB
CLI = [sys.executable, "-m", "tcmu_obd.cli.mount"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _missing():
    problems = blockdev.fuse_problems(("losetup", "mount", "umount", "mkfs.ext4", "e2fsck", "fusermount3"))
    return "; ".join(p for p, _ in problems) or None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


# -- helpers -------------------------------------------------------------------------------------

def cli(*args, check=True, timeout=60):
    p = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    if check and p.returncode:
        raise AssertionError(f"{args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def sh(*cmd, check=True):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    if check and p.returncode:
        raise AssertionError(f"{cmd}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def write_config(path, lowers, upper=None):
    doc = {"lowers": [{"file": str(f)} for f in lowers]}
    if upper:
        doc["upper"] = {"data": str(upper[0]), "index": str(upper[1])}
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


def new_upper(tmp, name="up"):
    data, index = tmp / f"{name}.data", tmp / f"{name}.index"
    RWLayer.create(str(data), str(index), 0).close()      # vsize 0: inherited from the base
    return data, index


def under(tmp):
    """Mounts (point, fstype, source) and loop devices (dev, backing) under tmp."""
    t = str(tmp) + "/"
    ms = [(p, fs, src) for p, fs, src, _ in fuse.mounts() if p.startswith(t)]
    loops = []
    for name in os.listdir("/sys/block"):
        if name.startswith("loop"):
            b = fuse.loop_backing(name)
            if b and b.startswith(t):
                loops.append(("/dev/" + name, b))
    return ms, loops


def daemon_alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rfind(b")") + 2:st.rfind(b")") + 3] != b"Z"


@pytest.fixture
def tmp(tmp_path):
    """tmp_path; afterwards nothing may be mounted or bound under it (what
    is found is cleaned up, then reported as a failure)."""
    yield tmp_path
    ms, loops = under(tmp_path)
    pids = [fuse.daemon_pid(src) for _, fs, src in ms if fs == "fuse." + fuse.SUBTYPE]
    for p, fs, _ in reversed(ms):
        if not fs.startswith("fuse"):
            sh("umount", "-l", p, check=False)
    for dev, _ in loops:
        sh("losetup", "-d", dev, check=False)
    for pid in pids:
        if pid and daemon_alive(pid):
            os.kill(pid, signal.SIGKILL)
    for p, fs, _ in reversed(ms):
        if fs.startswith("fuse"):
            sh("umount", "-l", p, check=False)
    assert not ms and not loops, f"left behind: mounts {ms}, loop devices {loops}"


def mounted_pid(mnt):
    m = fuse.mount_at(str(mnt))
    assert m is not None and m[0] == "fuse.tcmu-obd", m
    return fuse.daemon_pid(m[1])


def assert_gone(tmp, mnt, pid=None):
    ms, loops = under(tmp)
    assert not ms and not loops, (ms, loops)
    assert fuse.mount_at(str(mnt)) is None
    assert not fuse.loops_for(str(mnt / "disk"))
    if pid is not None:
        deadline = time.monotonic() + 10
        while daemon_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not daemon_alive(pid)


def read_ready_line(p, timeout=30):
    r, _, _ = select.select([p.stdout], [], [], timeout)
    assert r, "no readiness line"
    line = p.stdout.readline().strip()
    assert line, p.stderr.read()
    return line


def files_model(seed):
    rng = random.Random(seed)
    return {
        "big.bin": rng.randbytes(6 << 20),
        "odd.bin": rng.randbytes(123457),
        "dir/sub/small.txt": b"hello from tcmu-obd over FUSE\n",
        "empty": b"",
    }


# -- tests ---------------------------------------------------------------------------------------

def test_rw_ext4_commit_then_read_only(tmp):
    base = baselayer.path()
    mnt, ext = tmp / "mnt", tmp / "ext4"
    mnt.mkdir()
    ext.mkdir()
    data, index = new_upper(tmp)
    cfg_rw = write_config(tmp / "rw.json", [base], (data, index))

    dev = cli("mount", cfg_rw, mnt, "--loop").stdout.strip()
    pid = mounted_pid(mnt)
    assert dev.startswith("/dev/loop") and daemon_alive(pid)
    disk = str(mnt / "disk")
    assert fuse.loop_backing(dev) == disk and fuse.loop_dio(dev)
    assert os.stat(disk).st_size == VSIZE
    assert os.listdir(mnt) == ["disk"]
    assert fuse.loops_for(disk) == [dev]

    model = files_model(1)
    sh("mount", "-t", "ext4", dev, ext)
    try:
        for name, content in model.items():
            os.makedirs(os.path.dirname(ext / name), exist_ok=True)
            with open(ext / name, "wb") as f:
                f.write(content)
        sh("sync")
    finally:
        sh("umount", ext)
    cli("umount", mnt)
    assert_gone(tmp, mnt, pid)

    # commit the upper (ZFile) and stack it read-only on the base
    up = RWLayer.open(str(data), str(index))
    assert up.vsize == VSIZE
    committed = commit_layer(up, tmp / "committed", use_zfile=True)
    up.close()
    cfg_ro = write_config(tmp / "ro.json", [base, committed])

    dev = cli("mount", cfg_ro, mnt, "--loop", "--direct-io").stdout.strip()
    pid = mounted_pid(mnt)
    with open(f"/sys/block/{os.path.basename(dev)}/ro") as f:
        assert f.read().strip() == "1"
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as e:
            os.open(disk, flags)
        assert e.value.errno == errno.EROFS
    assert oct(os.stat(disk).st_mode & 0o777) == "0o444"

    sh("mount", "-t", "ext4", "-o", "ro", dev, ext)
    try:
        for name, content in model.items():
            with open(ext / name, "rb") as f:
                assert f.read() == content, name
    finally:
        sh("umount", ext)
    fsck = sh("e2fsck", "-fn", dev, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # concurrent readers: the FUSE file (page cache off: --direct-io) and the loop device,
    # against the same image opened in this process
    image = assemble.open_image(cfg_ro, service_config.load(None))
    try:
        errors = []

        def reader(seed, path):
            rng = random.Random(seed)
            fd = os.open(path, os.O_RDONLY)
            try:
                for _ in range(40):
                    # mostly where the ext4 metadata and the files are
                    off = rng.randrange(0, 256 << 20) if rng.random() < 0.8 else rng.randrange(0, VSIZE)
                    n = rng.choice([512, 4096, 65536, 1 << 20, rng.randrange(1, 300000)])
                    if path == dev:
                        off -= off % 512
                    if os.pread(fd, n, off) != image.pread(off, n):
                        errors.append((path, off, n))
            except Exception as e:     # noqa: BLE001
                errors.append(repr(e))
            finally:
                os.close(fd)

        threads = [threading.Thread(target=reader, args=(i, disk if i % 2 else dev)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:5]
    finally:
        image.close()

    cli("umount", mnt)
    assert_gone(tmp, mnt, pid)


def test_sigterm_teardown_waits_for_a_mounted_fs(tmp):
    """Foreground mount: `umount` refuses while ext4 is mounted on the loop
    device; SIGTERM then defers until that ext4 is unmounted, and leaves
    nothing behind."""
    mnt, ext = tmp / "mnt", tmp / "ext4"
    mnt.mkdir()
    ext.mkdir()
    cfg = write_config(tmp / "rw.json", [baselayer.path()], new_upper(tmp))
    p = subprocess.Popen(CLI + ["mount", cfg, str(mnt), "--loop", "--foreground"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dev = read_ready_line(p)
        assert fuse.loop_backing(dev) == str(mnt / "disk")
        sh("mount", "-t", "ext4", dev, ext)
        try:
            with open(ext / "f", "wb") as f:
                f.write(b"x" * 100000)
            r = cli("umount", mnt, check=False)
            assert r.returncode != 0 and "in use" in r.stderr, r.stderr
            assert fuse.loop_backing(dev) == str(mnt / "disk") and p.poll() is None

            p.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert p.poll() is None                        # still serving the mounted ext4
            with open(ext / "f", "rb") as f:
                assert f.read() == b"x" * 100000
        finally:
            sh("umount", ext)
        assert p.wait(30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert_gone(tmp, mnt)
    assert "in use" in p.stderr.read()


def test_sigterm_and_sigint_foreground(tmp):
    mnt = tmp / "mnt"
    mnt.mkdir()
    cfg = write_config(tmp / "ro.json", [baselayer.path()])
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = subprocess.Popen(CLI + ["mount", cfg, str(mnt), "--loop", "--foreground"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            dev = read_ready_line(p)
            with open(dev, "rb") as f:
                f.seek(1024)
                assert f.read(1024)[56:58] == b"\x53\xef"       # the ext4 superblock magic
            p.send_signal(sig)
            assert p.wait(30) == 0, p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert_gone(tmp, mnt)


def test_unaligned_io_punch_hole_fsync(tmp):
    """Through the file itself (no loop): unaligned writes read-modify-write,
    unaligned reads, fallocate(PUNCH_HOLE), fsync, the end of the disk; the
    upper holds the bytes after unmount."""
    mnt = tmp / "mnt"
    mnt.mkdir()
    data, index = new_upper(tmp)
    cfg = write_config(tmp / "rw.json", [baselayer.path()], (data, index))
    path = cli("mount", cfg, mnt).stdout.strip()
    pid = mounted_pid(mnt)
    assert path == str(mnt / "disk")
    region = 40 * GiB + 12345 * 512     # R: a region of the disk to edit
    size = 1 << 20
    fd = os.open(path, os.O_RDWR)
    try:
        model = bytearray(os.pread(fd, size, region))
        rng = random.Random(7)
        for off, n in [(1, 1000), (4095, 3), (8192, 4096), (100000, 70000), (511, 1), (600000, 513),
                       (size - 700, 700)]:
            chunk = rng.randbytes(n)
            assert os.pwrite(fd, chunk, region + off) == n
            model[off:off + n] = chunk
        assert os.pread(fd, size, region) == model
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        for off, n in [(300007, 20000), (0, 4096), (900001, 3)]:
            rc = libc.fallocate(fd, fuse.FALLOC_FL_PUNCH_HOLE | fuse.FALLOC_FL_KEEP_SIZE, region + off, n)
            assert rc == 0, os.strerror(ctypes.get_errno())
            model[off:off + n] = bytes(n)
        os.fsync(fd)
        assert os.pread(fd, size, region) == model
        assert os.pread(fd, 777, region + 13) == model[13:790]
        # the end of the disk
        assert len(os.pread(fd, 4096, VSIZE - 1000)) == 1000
        assert os.pread(fd, 10, VSIZE) == b""
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", VSIZE)
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 0)
        assert e.value.errno == errno.EPERM
    finally:
        os.close(fd)
    cli("umount", mnt)
    assert_gone(tmp, mnt, pid)
    image = assemble.open_image(cfg, service_config.load(None))
    try:
        assert image.pread(region, size) == model
    finally:
        image.close()


def test_killed_daemon_stale_mount_is_cleaned_by_umount(tmp):
    mnt = tmp / "mnt"
    mnt.mkdir()
    cfg = write_config(tmp / "ro.json", [baselayer.path()])
    dev = cli("mount", cfg, mnt, "--loop").stdout.strip()
    pid = mounted_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while daemon_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(OSError) as e:      # (stat may still answer from the attribute cache)
        os.open(mnt / "disk", os.O_RDONLY)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert fuse.loops_for(str(mnt / "disk")) == [dev]          # via sysfs: losetup -j cannot stat
    r = cli("mount", cfg, mnt, check=False)
    assert r.returncode != 0 and "stale" in r.stderr
    cli("umount", mnt)
    assert_gone(tmp, mnt)


def test_failures_leave_nothing(tmp):
    mnt = tmp / "mnt"
    mnt.mkdir()
    r = cli("mount", tmp / "missing.json", mnt, "--loop", check=False)
    assert r.returncode != 0 and "no such file" in r.stderr
    bad = tmp / "bad.layer"
    bad.write_bytes(b"\0" * 8192)
    r = cli("mount", write_config(tmp / "bad.json", [bad]), mnt, "--loop", check=False)
    assert r.returncode != 0 and r.stderr.startswith("error:"), r.stderr
    r = cli("mount", write_config(tmp / "ok.json", [baselayer.path()]), tmp / "nodir", check=False)
    assert r.returncode != 0
    r = cli("umount", mnt, check=False)
    assert r.returncode != 0 and "not mounted" in r.stderr
    r = cli("umount", "/proc", check=False)
    assert r.returncode != 0 and "leaving it alone" in r.stderr
    assert_gone(tmp, mnt)
