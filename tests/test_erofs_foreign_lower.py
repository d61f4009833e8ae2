"""The reader and the incremental writer against erofs images made by
another writer: mkfs.erofs 1.5 (compact and extended inodes, shared xattrs,
its own nid and block placement) builds the lower from a directory that
build/untar.py unpacked; the reader must see that tree (file blocks holding
the file's bytes), and a layer ErofsBuilder puts on top must mount as the
two tars unpacked in order."""
import os
import shutil
import subprocess

import pytest

from erofs_util import D, E, R, S, T0, build, diff, have_erofs, materialize, mounted, oracle, scan, \
    tar_bytes

from tcmu_obd.errors import CorruptDataError
from tcmu_obd.format.erofs_read import ErofsReader

SHARED = {"user.shared": b"the same on three files", "trusted.also": b"shared"}


def layer1():
    return [
        E(".", D),
        E("a", D, mode=0o750, uid=3, gid=4),
        *[E(f"a/f{i}", R, bytes([65 + i]) * (4096 * i + 100), xattrs=dict(SHARED, **{"user.own": b"%d" % i}),
            mtime=T0 + i) for i in range(3)],
        E("a/empty", R, b""),
        E("a/link", S, linkname="f1"),
        E("b", D),
        *[E(f"b/n{i:03d}", R, b"%d" % i) for i in range(200)],
    ]


def layer2():
    return [
        E(".", D),
        E("a", D, mode=0o755, uid=3, gid=4),
        E("a/.wh.f0", R),
        E("a/f1", R, b"replaced in layer 2"),
        E("a/new", R, b"n" * 5000, xattrs={"security.x": b"y"}),
        E("b", D),
        E("b/.wh..wh..opq", R),
        E("b/only", R, b"only"),
    ]


@pytest.mark.parametrize("fixed_time", [False, True], ids=["extended-inodes", "compact-inodes"])
def test_erofs_foreign_lower_from_mkfs_erofs(tmp_path, fixed_time):
    """-T gives every file the build time, so mkfs.erofs writes compact inodes."""
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("mkfs.erofs is not installed (apt-get install erofs-utils)")
    have_erofs()
    tar1, tar2 = tar_bytes(layer1()), tar_bytes(layer2())
    src = oracle(tmp_path / "src", [tar1])
    img1 = str(tmp_path / "mkfs.img")
    opts = ["-T", str(T0)] if fixed_time else ["--preserve-mtime"]
    r = subprocess.run(["mkfs.erofs", "--quiet", "-x1", "-Enoinline_data", *opts, img1, src],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(img1, "rb") as f:
        disk = f.read()
    reader = ErofsReader(lambda o, n: disk[o:o + n], name="mkfs")
    root = reader.tree()
    assert reader.used_blocks() * 4096 >= len(disk) - 4095
    files = root.children["a"].children
    for i in range(3):
        node = files[f"f{i}"]
        assert disk[node.blkaddr * 4096:node.blkaddr * 4096 + node.size] == bytes([65 + i]) * (4096 * i + 100)
        assert node.xattrs == dict(SHARED, **{"user.own": b"%d" % i})
    assert files["link"].target == b"f1"
    assert len(root.children["b"].children) == 200

    writes, mappings, _b = build(tar2, img1)
    img2 = materialize(tmp_path / "l2.img", tar2, writes, mappings, base=img1)
    want = scan(oracle(tmp_path / "want", [tar1, tar2]))
    with mounted(img2) as mnt:
        got = scan(mnt)
    # with -T the lower says T0 for a/f2 (the one layer-1 file with another mtime left)
    assert diff(got, want, skip_mtime={"a/f2"} if fixed_time else ()) == []
    if fixed_time:
        assert got[0]["a/f2"]["mtime_ns"] == T0 * 10**9
    assert os.path.getsize(img2) > os.path.getsize(img1)


def test_erofs_foreign_lower_superblock_checksum(tmp_path):
    """mkfs.erofs sets the superblock checksum feature: the reader verifies it."""
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("mkfs.erofs is not installed (apt-get install erofs-utils)")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    img = str(tmp_path / "m.img")
    subprocess.run(["mkfs.erofs", "--quiet", "-Enoinline_data", img, str(src)], check=True)
    with open(img, "rb") as f:
        disk = bytearray(f.read())
    assert ErofsReader(lambda o, n: bytes(disk[o:o + n])).tree().children["f"].size == 1
    disk[1024 + 100] ^= 1                                   # inside the checksummed range
    with pytest.raises(CorruptDataError, match=r"^m: superblock.checksum = "):
        ErofsReader(lambda o, n: bytes(disk[o:o + n]), name="m")
