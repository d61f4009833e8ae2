"""Shared helpers for the tests: building layers with the project's own
writers, and a small model of what a stack of layers reads as."""
import os

import pytest
from hypothesis import HealthCheck, settings

# No timed assertions: hypothesis's per-example deadline and its too-slow
# health check fail tests on a loaded machine, not on wrong behaviour; the
# examples are bounded by max_examples instead.
settings.register_profile("tcmu-obd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tcmu-obd")

# tests/vm/guest and tests/e2e run inside the qemu guest (tests/test_vm_guest.py and
# tests/test_e2e_guest.py boot it); their conftest.py must not replace this one as
# `conftest` for the host tests that import from it
if os.environ.get("TCMUVM_GUEST") != "1":
    collect_ignore_glob = ["vm/guest/*", "e2e"]

from tcmu_obd.image import commit
from tcmu_obd.image.output import Output
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer

SECTOR = 512


def commit_layer(upper, out_path, use_zfile=False, use_tar=False, algo=1, bs=4096, threads=1,
                 uuid=None, parent=None, tag=b""):
    """Commit an open RWLayer to out_path as overlaybd-commit would."""
    files = [upper.backing]
    header = commit.layer_info(files, uuid, parent, tag)
    out = Output(str(out_path), True, use_zfile, use_tar, algo, bs, threads, overwrite_header=use_zfile)
    try:
        commit.compact(upper.index.records(), files, out, header)
        out.close()
    finally:
        out.abort()
    return str(out_path)


def merge_layers(paths, out_path, use_zfile=False):
    """overlaybd-merge of committed layers (bottom -> top) into one."""
    image = Image([open_layer(p) for p in paths])
    try:
        files = image.files()
        header = commit.layer_info(files)
        out = Output(str(out_path), True, use_zfile)
        try:
            commit.compact(image.effective_records(), files, out, header)
            out.close()
        finally:
            out.abort()
    finally:
        image.close()
    return str(out_path)


def make_layer(tmp, name, writes, vsize=1 << 20, **kw):
    """A committed layer from [(offset, bytes) | (offset, length, 'discard')]."""
    d, i = os.path.join(tmp, name + ".data"), os.path.join(tmp, name + ".index")
    up = RWLayer.create(d, i, vsize)
    for w in writes:
        if len(w) == 3:
            up.discard(w[0], w[1])
        else:
            up.write(w[1], w[0])
    path = commit_layer(up, os.path.join(tmp, name), **kw)
    up.close()
    return path


class LayerModel:
    """Per-sector state of one layer: None = hole, b'' = zeroed, bytes = data."""

    def __init__(self, sectors):
        self.s = [None] * sectors

    def write(self, offset, data):
        for k in range(len(data) // SECTOR):
            self.s[offset // SECTOR + k] = bytes(data[k * SECTOR:(k + 1) * SECTOR])

    def discard(self, offset, length):
        for k in range(length // SECTOR):
            self.s[offset // SECTOR + k] = b""


def model_read(layers, offset, length):
    """Bytes of a stack of LayerModels (bottom -> top): topmost non-hole wins."""
    out = bytearray()
    for sec in range(offset // SECTOR, (offset + length) // SECTOR):
        val = None
        for layer in reversed(layers):
            if sec < len(layer.s) and layer.s[sec] is not None:
                val = layer.s[sec]
                break
        out += val if val else bytes(SECTOR)
    return bytes(out)


@pytest.fixture
def bundled_base():
    from tcmu_obd.image import baselayer
    return baselayer.path()


class FileSource:
    """A cache source that is a real local file read with pread; it only
    records the reads it serves (for tests that count fetches)."""

    def __init__(self, path):
        import threading
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.reads = []
        self.lock = threading.Lock()

    def read(self, offset, length):
        with self.lock:
            self.reads.append((offset, length))
        return os.pread(self.fd, min(length, self.size - offset), offset)

    def close(self):
        os.close(self.fd)


def mount_fs(path, fstype, size="64m"):
    """Mount a fresh ramfs or tmpfs at path (we run as root); skip if we cannot."""
    import subprocess
    os.makedirs(path, exist_ok=True)
    opts = [] if fstype == "ramfs" else ["-o", f"size={size}"]
    r = subprocess.run(["mount", "-t", fstype, *opts, fstype, str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount {fstype}: {r.stderr.strip()}")
    return path


def umount(path):
    import subprocess
    subprocess.run(["umount", "-l", str(path)], check=False)
