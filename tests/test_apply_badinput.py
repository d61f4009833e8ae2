"""overlaybd-apply on bad input (root, FUSE + loop + ext4): a wrong
--checksum, a corrupt tar header, a truncated gzip stream, a layer larger
than the disk (ENOSPC), a config without an upper, an unsupported flag.  Each
fails with a clear message and a non-zero exit, the append-only upper is byte
for byte what it was before (also when --mkfs ran first), and a sparse upper
is never written when the checksum is wrong.  Nothing stays mounted."""
import gzip
import hashlib
import json
import os
import subprocess
import sys

import pytest

from tcmu_obd.build import apply
from tcmu_obd.image import baselayer
from test_apply_untar import D, E, R, S, Model, compare, missing, mount_ro, new_image, tar_bytes

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "tcmu_obd.cli.apply"]


def cli(*args, input=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=False, timeout=120,
                          cwd=ROOT, input=input)


def digest_of(*paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
        h.update(b"|")
    return h.hexdigest()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


def our_loops():
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "/fuse/disk" in line and "obd-apply-" in line]


@pytest.fixture
def img(tmp_path):
    """An upper over the base layer that already holds one applied layer."""
    tmp = str(tmp_path)
    cfg, data, index = new_image(tmp, [baselayer.path()])
    first = [E("keep", D), E("keep/me", R, b"original")]
    apply.apply_layer(write(os.path.join(tmp, "first.tar"), tar_bytes(first)), cfg)
    before = digest_of(data, index)
    yield tmp, cfg, data, index, first
    assert digest_of(data, index) == before, "the upper layer changed"
    assert not our_loops()
    model = Model()
    model.apply(first)
    with mount_ro(cfg, tmp) as mnt:
        compare(model, mnt)


LAYER = [E("new", D), E("new/file", R, b"x" * 10000), E("keep/me", R, b"overwritten"),
         E("new/l", S, linkname="file")]


def test_wrong_checksum(img):
    tmp, cfg, *_ = img
    t = tar_bytes(LAYER)
    p = cli("--checksum", "sha256:" + hashlib.sha256(t + b"x").hexdigest(),
            write(os.path.join(tmp, "l.tar"), t), cfg)
    assert p.returncode == 1
    assert b"checksum mismatch" in p.stderr and hashlib.sha256(t).hexdigest().encode() in p.stderr


def test_checksum_of_a_gzip_layer_is_of_the_uncompressed_tar(img):
    tmp, cfg, *_ = img
    gz = gzip.compress(tar_bytes(LAYER))
    p = cli("--checksum", "sha256:" + hashlib.sha256(gz).hexdigest(), "-", cfg, input=gz)
    assert p.returncode == 1 and b"checksum mismatch" in p.stderr


def test_bad_checksum_syntax(img):
    tmp, cfg, *_ = img
    p = cli("--checksum", "md5:1234", write(os.path.join(tmp, "l.tar"), tar_bytes(LAYER)), cfg)
    assert p.returncode == 1 and b"sha256:<64 hex digits>" in p.stderr


def test_corrupt_header(img):
    tmp, cfg, *_ = img
    t = bytearray(tar_bytes(LAYER))
    # the third member's header: a flipped byte in its name breaks the header checksum
    import tarfile
    import io
    off = tarfile.open(fileobj=io.BytesIO(bytes(t))).getmembers()[2].offset
    t[off + 3] ^= 0x55
    p = cli(write(os.path.join(tmp, "bad.tar"), bytes(t)), cfg)
    assert p.returncode == 1
    assert b"corrupt tar" in p.stderr and b"bad checksum" in p.stderr


def test_truncated_inputs(img):
    tmp, cfg, *_ = img
    t = tar_bytes(LAYER)
    p = cli(write(os.path.join(tmp, "short.tar"), t[:1536 + 700]), cfg)     # inside file data
    assert p.returncode == 1 and b"unexpected end of data" in p.stderr
    gz = gzip.compress(t + os.urandom(200000))
    p = cli(write(os.path.join(tmp, "short.tgz"), gz[:len(gz) // 2]), cfg)
    assert p.returncode == 1 and b"corrupt gzip stream" in p.stderr
    p = cli(write(os.path.join(tmp, "junk"), b"this is not a tar file" * 100), cfg)
    assert p.returncode == 1 and b"not a tar archive" in p.stderr


def test_unsupported_and_missing_upper(img):
    tmp, cfg, *_ = img
    layer = write(os.path.join(tmp, "l.tar"), tar_bytes(LAYER))
    p = cli("--from_qcow2", layer, cfg)
    assert p.returncode == 1 and b"not supported" in p.stderr
    ro = os.path.join(tmp, "ro.json")
    with open(ro, "w") as f:
        json.dump({"lowers": [{"file": baselayer.path()}]}, f)
    p = cli(layer, ro)
    assert p.returncode == 1 and b"no upper layer" in p.stderr
    p = cli(os.path.join(tmp, "nope.tar"), cfg)
    assert p.returncode == 1 and b"cannot open" in p.stderr


def test_layer_larger_than_the_disk(tmp_path):
    """A 16 MiB disk made by --mkfs, a 40 MB layer: ENOSPC is reported and the
    upper is rolled back to before the mkfs."""
    tmp = str(tmp_path)
    cfg, data, index = new_image(tmp, vsize=16 << 20)
    before = digest_of(data, index)
    big = [E("a", R, os.urandom(1 << 20) * 20), E("b", R, os.urandom(1 << 20) * 20)]
    p = cli("--mkfs", write(os.path.join(tmp, "big.tar"), tar_bytes(big)), cfg)
    assert p.returncode == 1
    assert b"does not fit" in p.stderr and b"no space left" in p.stderr
    assert digest_of(data, index) == before
    assert not our_loops()


def test_sparse_upper_is_not_written_on_a_wrong_checksum(tmp_path):
    tmp = str(tmp_path)
    cfg, data, index = new_image(tmp, [baselayer.path()], sparse=True)
    def state():        # the data file is 64 GiB, sparse: its allocation, head and mtime
        st = os.stat(data)
        with open(data, "rb") as f:
            return st.st_size, st.st_blocks, st.st_mtime_ns, hashlib.sha256(f.read(1 << 20)).digest()
    before = state()
    t = tar_bytes(LAYER)
    p = cli("--checksum", "sha256:" + "0" * 64, "-", cfg, input=gzip.compress(t))
    assert p.returncode == 1 and b"nothing was applied" in p.stderr
    assert state() == before
    # and the right checksum goes through the same spool
    p = cli("--checksum", "sha256:" + hashlib.sha256(t).hexdigest(), "-", cfg, input=gzip.compress(t))
    assert p.returncode == 0, p.stderr
    model = Model()
    model.apply(LAYER)
    with mount_ro(cfg, tmp) as mnt:
        compare(model, mnt)


def test_sigterm_mid_apply_unwinds(img):
    """SIGTERM while the tar is still arriving (a FIFO that never ends):
    exit 143, the ext4 unmounted, the device detached, the upper back as it
    was (the img fixture checks the last two)."""
    import signal
    import time
    tmp, cfg = img[0], img[1]
    fifo = os.path.join(tmp, "slow.fifo")
    os.mkfifo(fifo)
    p = subprocess.Popen(CLI + [fifo, cfg], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(fifo, "wb") as w:
        w.write(tar_bytes([E("partial", D), E("partial/a", R, b"x" * 100000)])[:60000])
        w.flush()
        deadline = time.monotonic() + 60
        while not any("/obd-apply-" in line and "/mnt ext4 " in line for line in open("/proc/mounts")):
            assert p.poll() is None, f"exited {p.returncode} before mounting"
            assert time.monotonic() < deadline, "the apply did not mount within 60 s"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert b"SIGTERM: stopped, cleaned up" in err, err
    assert not any("obd-apply-" in line for line in open("/proc/mounts"))

