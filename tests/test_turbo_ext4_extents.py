"""tcmu_obd.format.ext4's extent_leaf_entries and build.turbo's unwritten-
extent patcher on a real ext4 made by mkfs.ext4 (loop device, root only):
files whose extents live in i_block and in extent leaf blocks (a depth-1
tree), written and fallocate'd (unwritten).  The entries' disk locations
are checked by reading the 12 bytes there and against FIEMAP of the mounted
file; after patching, e2fsck -fn is clean and every extent is written."""
import os
import struct
import subprocess

import pytest

from test_apply_untar import missing
from tcmu_obd.build import apply, turbo
from tcmu_obd.format.ext4 import Ext4
from tcmu_obd.serve import blockdev

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

BS = 4096


class RawImage:
    """Just what patch_unwritten needs of an Image, over a raw file."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)
        self.virtual_size = os.fstat(self.fd).st_size

    def pread(self, off, n):
        return os.pread(self.fd, n, off)

    read = pread

    def write(self, data, off):
        os.pwrite(self.fd, data, off)

    def fsync(self):
        os.fsync(self.fd)


def test_turbo_ext4_extent_entries_and_unwritten_patch(tmp_path):
    raw = str(tmp_path / "fs.img")
    with open(raw, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(apply.MKFS_CMD + [raw], check=True, capture_output=True)
    fiemaps, inos = {}, set()
    with blockdev.raw_loop(raw) as dev, apply.mounted(dev, str(tmp_path / "m")) as mnt:
        # 1: 40 one-block extents (every other block): a leaf block under i_block
        p = os.path.join(mnt, "frag")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        for k in range(40):
            os.pwrite(fd, b"%d" % k * 100, 2 * k * BS)
        os.fsync(fd)
        fiemaps["frag"] = (os.fstat(fd).st_ino, turbo.fiemap(fd, os.fstat(fd).st_size, p))
        os.close(fd)
        # 2: fallocate'd (unwritten), in i_block; 3: fallocate'd in pieces with holes (a leaf block)
        for name, pieces in (("unw", [(0, 3 << 20)]), ("unw-frag", [(2 * k * BS, BS) for k in range(30)])):
            p = os.path.join(mnt, name)
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
            for off, n in pieces:
                assert turbo._libc.fallocate(fd, 0, off, n) == 0
            ino = os.fstat(fd).st_ino
            inos.add(ino)
            fiemaps[name] = (ino, turbo.fiemap(fd, os.fstat(fd).st_size, p))
            os.close(fd)

    img = RawImage(raw)
    fs = Ext4(img.pread, img.virtual_size, raw)
    for name, (ino, fm) in fiemaps.items():
        entries = fs.extent_leaf_entries(ino)
        got = []
        for where, lblk, ln, pblk in entries:
            l2, n2, hi, lo = struct.unpack("<IHHI", img.pread(where, 12))
            assert (l2, n2, hi << 32 | lo) == (lblk, ln, pblk)       # the location holds that entry
            got.append((lblk * BS, pblk * BS, (ln - 32768 if ln > 32768 else ln) * BS))
        assert got == [(lo, ph, ln) for lo, ph, ln in fm], name
        unwritten = [ln > 32768 for _w, _l, ln, _p in entries]
        assert all(unwritten) if name != "frag" else not any(unwritten)
        if name != "unw":
            assert any(w // BS != fs.inode(ino).disk_offset // BS for w, *_ in entries)  # in a leaf block

    assert turbo.patch_unwritten(img, inos, raw) == len(fiemaps["unw"][1]) + len(fiemaps["unw-frag"][1])
    fs = Ext4(img.pread, img.virtual_size, raw)
    for ino in inos:
        assert all(ln <= 32768 for _w, _l, ln, _p in fs.extent_leaf_entries(ino))
    os.close(img.fd)
    fsck = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
