"""The TCMU daemon end to end, inside the qemu guest (python tests/vm/run.py
-- $TCMUVM_PYTHON -m pytest tests/vm/guest/test_tcmu_handler.py): the daemon
(`python -m tcmu_obd.cli.serve serve`), configfs attach/detach, reads that
match Image.read, ext4 mounts, writes committed to a new layer, write
protection, discard, unsupported opcodes, many devices at once, and a
kill -9 of the daemon under a read load.  Skipped where target_core_user is
not loaded (the host)."""
import contextlib
import hashlib
import json
import mmap
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/sys/module/target_core_user"),
                                reason="needs target_core_user (runs in the qemu guest)")

from tcmu_obd.serve import attach as att  # noqa: E402
from tcmu_obd.image import assemble, baselayer  # noqa: E402
from tcmu_obd.image.rw import RWLayer  # noqa: E402


def _tests_conftest():
    """tests/conftest.py (its name clashes with this directory's conftest)."""
    import importlib.util
    path = Path(__file__).resolve().parents[2] / "conftest.py"
    spec = importlib.util.spec_from_file_location("obd_tests_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


commit_layer = _tests_conftest().commit_layer

PY = os.environ.get("TCMUVM_PYTHON", sys.executable)
MiB = 1 << 20
N_DEVICES = int(os.environ.get("TCMUVM_TEST_DEVICES", "64"))


def sh(cmd, check=True, timeout=300):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{cmd!r} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


class Daemon:
    def __init__(self, d):
        self.dir = d
        self.svc = d / "overlaybd.json"
        self.svc.write_text(json.dumps({
            "logConfig": {"logPath": str(d / "overlaybd.log"), "logLevel": 0},
            "enableAudit": True, "auditPath": str(d / "audit.log"),
            "cacheConfig": {"cacheType": "file", "cacheDir": str(d / "cache")}}))
        self.pid_file = d / "serve.pid"
        self.proc = None

    def start(self, timeout=240):
        try:
            self.pid_file.unlink()
        except FileNotFoundError:
            pass
        err = open(self.dir / "stderr.log", "ab")
        self.proc = subprocess.Popen([PY, "-m", "tcmu_obd.cli.serve", "serve", str(self.svc),
                                      "--pid-file", str(self.pid_file)],
                                     stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}: {self.log()}"
            assert time.monotonic() < deadline, "daemon not ready"
            time.sleep(0.1)

    def log(self):
        p = self.dir / "overlaybd.log"
        return p.read_text() if p.exists() else ""

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(120)
        return self.proc.returncode if self.proc else None


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("tcmu")


@contextlib.contextmanager
def running_daemon(d_dir):
    """A started Daemon in d_dir; at the end every device left is detached
    and the daemon must exit 0 on SIGTERM."""
    d = Daemon(d_dir)
    d.start()
    yield d
    for dev in att.list_devices():
        if dev["dev_id"]:
            try:
                att.detach(dev["dev_id"], force=True)
            except Exception:
                pass
    assert d.stop() == 0, d.log()[-3000:]


@pytest.fixture(scope="module")
def daemon(configfs, work):
    with running_daemon(work) as d:
        yield d


@contextlib.contextmanager
def attached_ro(cfg, dev_id, mnt):
    """cfg attached as dev_id with its ext4 mounted read-only at mnt; both undone after."""
    dev = att.attach(cfg, dev_id)
    try:
        sh(f"mount -o ro {dev} {mnt}")
        try:
            yield mnt
        finally:
            sh(f"umount {mnt}")
    finally:
        att.detach(dev_id)


def write_config(path, lowers=(), upper=None):
    doc = {"lowers": [{"file": str(f)} for f in lowers], "resultFile": str(path) + ".result"}
    if upper:
        doc["upper"] = {"data": str(upper[0]), "index": str(upper[1])}
    Path(path).write_text(json.dumps(doc))
    return str(path)


def sg_of(dev):
    name = os.path.basename(dev)
    return "/dev/" + os.listdir(f"/sys/block/{name}/device/scsi_generic")[0]


def pread_direct(fd, offset, length):
    buf = mmap.mmap(-1, length)
    n = os.preadv(fd, [buf], offset)
    data = buf[:n]
    buf.close()
    return data


def tree_digest(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "lost+found"]
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def make_tree(root, seed):
    rnd = random.Random(seed)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text(f"hello from seed {seed}\n")
    (root / "dir" / "random.bin").write_bytes(rnd.randbytes(3 * MiB + 1234))
    (root / "dir" / "sub" / "small").write_bytes(rnd.randbytes(777))
    os.symlink("../hello.txt", root / "dir" / "link")
    return tree_digest(root)


def fs_layer(work):
    """A layer built with the project's tools: a 64 MiB ext4 (mke2fs -d) written
    into an RW layer with the base's vsize, committed as ZFile in tar."""
    src = work / "fs-src"
    want = make_tree(src, 1)
    raw = work / "fs.img"
    sh(f"mke2fs -q -F -t ext4 -b 4096 -d {src} {raw} 64M")
    vsize = assemble.open_image(write_config(work / "base.json", [baselayer.path()])).virtual_size
    up = RWLayer.create(str(work / "fs.data"), str(work / "fs.index"), vsize)
    with open(raw, "rb") as f:
        pos = 0
        while True:
            chunk = f.read(MiB)
            if not chunk:
                break
            for k in range(0, len(chunk), 4096):
                blk = chunk[k:k + 4096]
                if blk.count(0) != len(blk):
                    up.write(blk, pos + k)
            pos += len(chunk)
    path = commit_layer(up, work / "fs.layer", use_zfile=True, use_tar=True)
    up.close()
    return path, want


# ---------------------------------------------------------------------------------------------
def test_readonly_stack_reads_and_mounts(daemon, work):
    layer, want = fs_layer(work)
    cfg = write_config(work / "ro.json", [baselayer.path(), layer])
    r = sh(f"{PY} -m tcmu_obd.cli.serve attach {cfg} --dev-id 101")
    dev = r.stdout.strip()
    assert dev.startswith("/dev/sd"), r
    assert Path(cfg + ".result").read_text() == "success"
    name = os.path.basename(dev)
    assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
    assert Path(f"/sys/block/{name}/queue/max_sectors_kb").read_text().strip() == "1024"
    image = assemble.open_image(cfg)
    assert int(Path(f"/sys/block/{name}/size").read_text()) * 512 == image.virtual_size
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        for off in range(0, 64 * MiB, MiB):          # the tool layer, 1 MiB commands
            assert pread_direct(fd, off, MiB) == image.read(off, MiB), off
        for off in (64 * MiB, 1 << 30, 5 << 30, image.virtual_size - MiB):   # the base below
            assert pread_direct(fd, off, MiB) == image.read(off, MiB), off
        assert pread_direct(fd, 4096 * 3 + 512, 4096) == image.read(4096 * 3 + 512, 4096)
    finally:
        os.close(fd)
        image.close()
    mnt = work / "mnt-ro"
    mnt.mkdir()
    sh(f"mount -o ro {dev} {mnt}")
    try:
        assert tree_digest(mnt) == want
    finally:
        sh(f"umount {mnt}")
    listed = {d["dev_id"]: d for d in att.list_devices()}
    assert listed["101"]["disk"] == dev and listed["101"]["config"] == cfg
    sh(f"{PY} -m tcmu_obd.cli.serve detach {dev}")
    assert not os.path.exists(att.core_dir("101"))
    closed = [ln for ln in daemon.log().splitlines() if " closed " + cfg in ln]
    assert closed and "max_read=1048576" in closed[-1], closed     # a 1 MiB read was one command
    # sd's probes on attach (REPORT SUPPORTED OPERATION CODES is not supported) are
    # rejections the kernel expects, not errors
    counts = dict(re.findall(r"\b(errors|rejected)=(\d+)", closed[-1]))
    assert counts["errors"] == "0" and int(counts["rejected"]) > 0, closed


def test_write_protect_and_sense(daemon, work):
    cfg = write_config(work / "base-ro.json", [baselayer.path()])
    dev = att.attach(cfg, "102")
    sg = sg_of(dev)
    try:
        # WRITE(10) of one block: DATA PROTECT / WRITE PROTECTED
        r = sh(f"sg_raw -s 512 -i /dev/zero {sg} 2a 00 00 00 00 10 00 00 01 00", check=False)
        text = (r.stdout + r.stderr).lower()
        assert r.returncode != 0 and "data protect" in text and "write protected" in text, text
        r = sh(f"dd if=/dev/zero of={dev} bs=4096 count=1 oflag=direct", check=False)
        assert r.returncode != 0
        # an opcode nobody implements (VERIFY(10)): ILLEGAL REQUEST, invalid opcode
        r = sh(f"sg_raw {sg} 2f 00 00 00 00 00 00 00 01 00", check=False)
        text = (r.stdout + r.stderr).lower()
        assert "illegal request" in text and "invalid command operation code" in text, text
        # READ(16) past the end: LBA OUT OF RANGE
        r = sh(f"sg_raw -r 512 {sg} 88 00 00 00 00 01 00 00 00 00 00 00 00 01 00 00", check=False)
        text = (r.stdout + r.stderr).lower()
        assert "illegal request" in text and "out of range" in text, text
        # INQUIRY VPD B0: max transfer length 2048 blocks
        r = sh(f"sg_raw -r 64 {sg} 12 01 b0 00 40 00")
        assert "00 00 08 00" in r.stdout + r.stderr
        # SYNCHRONIZE CACHE on a read-only device is fine
        sh(f"sg_sync {sg}")
    finally:
        att.detach("102")


def test_writable_commit_roundtrip(daemon, work):
    updata, upindex = work / "w.data", work / "w.index"
    RWLayer.create(str(updata), str(upindex), 0).close()
    cfg = write_config(work / "rw.json", [baselayer.path()], (updata, upindex))
    dev = att.attach(cfg, "103")
    name = os.path.basename(dev)
    assert Path(f"/sys/block/{name}/ro").read_text().strip() == "0"
    cache = next(Path(f"/sys/block/{name}/device/scsi_disk").iterdir()) / "cache_type"
    # WCE=0 by default, as overlaybd reports: every write is durable when acknowledged
    assert cache.read_text().strip() == "write through"
    mnt = work / "mnt-rw"
    mnt.mkdir()
    sh(f"mount {dev} {mnt}")
    try:
        want = make_tree(mnt / "data", 2)
        sh("sync")
    finally:
        sh(f"umount {mnt}")
    att.detach("103")
    up = RWLayer.open(str(updata), str(upindex))
    assert len(up.index) > 0
    committed = commit_layer(up, work / "w.layer", use_zfile=True)
    up.close()
    cfg2 = write_config(work / "committed.json", [baselayer.path(), committed])
    with attached_ro(cfg2, "104", mnt):
        assert tree_digest(mnt / "data") == want


def test_mkfs_discard_write_same(daemon, work):
    updata, upindex = work / "d.data", work / "d.index"
    RWLayer.create(str(updata), str(upindex), 256 * MiB).close()
    cfg = write_config(work / "disc.json", [], (updata, upindex))
    dev = att.attach(cfg, "105")
    sg = sg_of(dev)
    mnt = work / "mnt-d"
    mnt.mkdir()
    try:
        sh(f"mkfs.ext4 -q -F {dev}")                   # discards the device first
        sh(f"mount {dev} {mnt}")
        want = make_tree(mnt / "t", 3)
        sh(f"umount {mnt}")
        sh(f"dd if=/dev/urandom of={dev} bs=1M seek=200 count=8 oflag=direct")
        sh(f"blkdiscard -o {201 * MiB} -l {2 * MiB} {dev}")
        sh(f"sg_write_same --unmap --lba={204 * 2048} --num=2048 {sg}")
        # WRITE SAME of a non-zero block without UNMAP writes the pattern
        pat = work / "pattern"
        pat.write_bytes(b"\xab" * 512)
        sh(f"sg_write_same --in={pat} --lba={206 * 2048} --num=16 {sg}")
        sh(f"sg_sync {sg}")
    finally:
        att.detach("105")
    up = RWLayer.open(str(updata), str(upindex))
    recs = up.index.records()
    zeroed = [(r[0], r[1]) for r in recs if r[3]]
    assert any(o <= 201 * 2048 and o + n >= 203 * 2048 for o, n in zeroed) or \
        sum(n for o, n in zeroed if 201 * 2048 <= o < 203 * 2048) >= 4096, zeroed[:20]
    up.close()
    image = assemble.open_image(cfg)
    try:
        assert image.read(201 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert image.read(204 * MiB, MiB) == bytes(MiB)
        assert image.read(200 * MiB, MiB).count(0) < MiB // 2
        assert image.read(206 * MiB, 16 * 512) == b"\xab" * (16 * 512)
    finally:
        image.close()
    with attached_ro(cfg, "106", mnt):
        assert tree_digest(mnt / "t") == want


def test_failed_open_reports_result_file(daemon, work):
    cfg = write_config(work / "bad.json", [work / "no-such-layer"])
    with pytest.raises(att.AttachError) as ei:
        att.attach(cfg, "107")
    assert "failed" in str(ei.value) and "no-such-layer" in str(ei.value)
    assert not os.path.exists(att.core_dir("107"))


def test_many_devices(daemon, work):
    cfg = write_config(work / "many.json", [baselayer.path()])
    ids = [str(200 + i) for i in range(N_DEVICES)]
    devs, errors = {}, []

    def one(i):
        try:
            devs[i] = att.attach(cfg, i, wait=180, enable_timeout=300)
        except Exception as e:       # noqa: BLE001
            errors.append(f"{i}: {e}")
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    try:
        assert not errors, errors
        assert len(set(devs.values())) == N_DEVICES
        expect = assemble.open_image(cfg).read(0, 8192)
        for dev in devs.values():
            fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
            try:
                assert pread_direct(fd, 0, 8192) == expect
            finally:
                os.close(fd)
        print(f"{N_DEVICES} devices attached at once in {took:.1f} s")
    finally:
        for i in devs:
            att.detach(i)


def test_daemon_kill9_restart_under_load(daemon, work):
    cfg = write_config(work / "load.json", [baselayer.path()])
    dev = att.attach(cfg, "108")
    image = assemble.open_image(cfg)
    span = 32 * MiB
    expect = image.read(0, span)
    image.close()
    state = {"passes": 0, "errors": [], "stop": False}

    def reader():
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            while not state["stop"]:
                for off in range(0, span, 256 * 1024):
                    try:
                        got = pread_direct(fd, off, 256 * 1024)
                    except OSError as e:
                        state["errors"].append(f"{off}: {e}")
                        return
                    if got != expect[off:off + 256 * 1024]:
                        state["errors"].append(f"{off}: wrong data")
                        return
                state["passes"] += 1
        finally:
            os.close(fd)
    t = threading.Thread(target=reader)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while state["passes"] < 1 and not state["errors"] and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.kill9()
        time.sleep(1)
        before = state["passes"]
        daemon.start()
        deadline = time.monotonic() + 180
        while state["passes"] < before + 2 and not state["errors"] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        state["stop"] = True
        t.join(300)
    assert not state["errors"], state["errors"]
    assert state["passes"] >= before + 2
    att.detach("108")
    assert re.search(r"\b[1-9][0-9]* devices re-added", daemon.log()), daemon.log()[-2000:]
