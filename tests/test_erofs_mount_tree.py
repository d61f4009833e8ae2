"""A first TurboOCI erofs meta layer, built by ErofsBuilder from a tar made
with Python's tarfile, materialized (metadata writes + data mapped from the
tar), mounted by the kernel and compared, path by path, with the same tar
unpacked by build/untar.py into a real directory; fsck.erofs 1.5 must pass
on it.  Layers on top: test_erofs_incremental.py; random trees:
test_erofs_random_trees.py."""
import os

from erofs_util import B, C, D, E, F, H, R, S, T0, build, diff, fsck, have_erofs, materialize, \
    mounted, oracle, scan, tar_bytes

LONG_DIR = "deep/" + "/".join(["d" * 60] * 3)          # > 100 characters: pax path
LONG_NAME = "n" * 255


def layer1():
    big = os.urandom(3 * 4096 + 77)
    return [
        E(".", D, mode=0o755, mtime=T0 - 5),
        E("etc", D, mode=0o755),
        E("etc/empty", R, b""),
        E("etc/one", R, b"x"),
        E("etc/sector", R, b"s" * 512),
        E("etc/block", R, b"b" * 4096),
        E("etc/odd", R, os.urandom(4097)),
        E("etc/big", R, big, uid=1234567, gid=7654321, mtime=T0 + 99, pax_mtime=f"{T0 + 99}.123456789"),
        E("deep", D, mode=0o700),
        E("deep/" + "d" * 60, D),
        E("deep/" + "/".join(["d" * 60] * 2), D),
        E(LONG_DIR, D, mode=0o1777),
        E(LONG_DIR + "/f", R, b"deep file\n", mode=0o4755),
        E("etc/" + LONG_NAME, R, b"long name"),
        E("bin", D),
        E("bin/sgid", R, b"#!/bin/sh\n", mode=0o2755, uid=0, gid=50),
        E("bin/short", S, linkname="sgid"),
        E("bin/abs", S, linkname="/etc/big"),
        E("bin/long", S, linkname="/" + "t" * 3000),
        E("bin/long-plain", S, linkname="/" + "p" * 3000, xattrs={"trusted.big": b"B" * 2000}),  # no room inline
        E("bin/dangling", S, linkname="nowhere/at/all"),
        E("bin/hard", H, linkname="etc/big", uid=1234567, gid=7654321, mtime=T0 + 99,
          pax_mtime=f"{T0 + 99}.123456789"),
        E("bin/hard2", H, linkname="bin/sgid", mode=0o2755, gid=50),
        E("dev", D),
        E("dev/null", C, devmajor=1, devminor=3, mode=0o666),
        E("dev/sda", B, devmajor=8, devminor=0, mode=0o660, gid=6),
        E("dev/big-minor", C, devmajor=240, devminor=70000),
        E("dev/fifo", F, mode=0o600),
        E("x", D, xattrs={"user.dir": b"on a dir"}),
        E("x/attrs", R, b"xattrs", xattrs={"user.a": b"1", "user.empty": b"", "trusted.t": b"\x00\xffbin",
                                            "security.s": b"sec" * 40}),
        E("many", D, xattrs={"user.big": b"M" * 3500}),        # its last dir block cannot be inline
        *[E(f"many/file-{i:04d}-" + "z" * (i % 50), R, b"%d\n" % i, mtime=T0 + i) for i in range(400)],
        E("many/.hidden", R, b"h"),
        E("many/-dash", R, b"d"),
    ]


def test_erofs_mount_tree_matches_untar_and_fsck(tmp_path):
    have_erofs()
    tar = tar_bytes(layer1())
    writes, mappings, builder = build(tar)
    img = materialize(tmp_path / "l1.img", tar, writes, mappings)

    # data is mapped, never written: no write overlaps a mapping, every mapping is 512-aligned
    spans = sorted((off, off + len(data)) for off, data in writes)
    for off, length, toff in mappings:
        assert not any(a < off + length and off < b for a, b in spans), (off, length)
    assert sum(len(d) for _o, d in writes) < 64 * 4096
    assert writes[0][0] == 0 and len(writes[0][1]) == 4096

    want = scan(oracle(tmp_path, [tar]))
    with mounted(img) as mnt:
        got = scan(mnt)
    assert diff(got, want) == []
    assert got[0]["bin/long"]["body"] == "/" + "t" * 3000
    assert got[0]["dev/big-minor"]["rdev"] == (240, 70000)
    assert got[0]["bin/long-plain"]["xattrs"] == {"trusted.big": b"B" * 2000}

    rc, out = fsck(img)
    assert rc == 0, out


def test_erofs_mount_tree_empty_layer(tmp_path):
    """A tar with no members gives an empty root directory that mounts and checks clean."""
    have_erofs()
    tar = tar_bytes([])
    writes, mappings, _b = build(tar)
    assert mappings == []
    img = materialize(tmp_path / "e.img", tar, writes, mappings)
    with mounted(img) as mnt:
        assert os.listdir(mnt) == []
        assert oct(os.stat(mnt).st_mode) == oct(0o40755)
    assert fsck(img)[0] == 0


def _acl(*entries):
    """A POSIX ACL xattr value: version 2, then (tag, perm, id) entries."""
    import struct
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_erofs_mount_tree_posix_acls(tmp_path):
    """system.posix_acl_access/default are stored under their own name indexes
    (no name suffix) and the kernel reads them back as the same ACLs."""
    have_erofs()
    from tcmu_obd.format.erofs import ErofsBuilder, TarEntry
    access = _acl((0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
                  (0x20, 0, 0xFFFFFFFF))
    default = _acl((0x01, 7, 0xFFFFFFFF), (0x04, 5, 0xFFFFFFFF), (0x08, 5, 77), (0x10, 5, 0xFFFFFFFF),
                   (0x20, 5, 0xFFFFFFFF))
    b = ErofsBuilder()
    b.add(TarEntry("d", "dir", 0o750, xattrs={"system.posix_acl_access": access,
                                               "system.posix_acl_default": default}))
    writes, mappings = b.finish()
    img = materialize(tmp_path / "acl.img", b"", writes, mappings)
    with mounted(img) as mnt:
        d = os.path.join(mnt, "d")
        assert os.getxattr(d, "system.posix_acl_access") == access
        assert os.getxattr(d, "system.posix_acl_default") == default
    assert fsck(img)[0] == 0


def test_erofs_mount_tree_inode_larger_than_a_block(tmp_path):
    """xattrs of more than a block make the inode record cross block
    boundaries (and a directory's or symlink's data go to whole blocks); the
    kernel still reads every value back.  (Not compared with untar: ext4
    holds at most a block of xattrs per inode.)"""
    have_erofs()
    from tcmu_obd.format.erofs import ErofsBuilder, TarEntry
    big = {f"user.v{i}": bytes([48 + i]) * 3300 for i in range(3)}
    b = ErofsBuilder()
    b.add(TarEntry("a", "file", xattrs=big))
    b.add(TarEntry("d", "dir", 0o755, xattrs=big))
    b.add(TarEntry("d/s", "symlink", linkname="../a", xattrs={"trusted.v": b"t" * 5000}))
    b.add(TarEntry("e", "file", size=5, data_offset=0, xattrs=big))
    writes, mappings = b.finish()
    img = materialize(tmp_path / "x.img", b"hello" + bytes(507), writes, mappings)
    with mounted(img) as mnt:
        for p in ("a", "d", "e"):
            path = os.path.join(mnt, p)
            assert {k: os.getxattr(path, k) for k in os.listxattr(path)} == big
        assert os.readlink(os.path.join(mnt, "d/s")) == "../a"
        assert os.getxattr(os.path.join(mnt, "d/s"), "trusted.v", follow_symlinks=False) == b"t" * 5000
        with open(os.path.join(mnt, "e"), "rb") as f:
            assert f.read() == b"hello"
    assert fsck(img)[0] == 0
