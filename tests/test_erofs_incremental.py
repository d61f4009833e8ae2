"""Incremental TurboOCI erofs meta layers: a second (and third) layer built
over the lower erofs image (read back by format/erofs_read.py) with
whiteouts, an opaque directory, replaced files and directories, a new hard
link to a lower file; the merged block device (lower image + this layer's
writes and mappings) must mount as the tars unpacked in order by
build/untar.py, and must never overwrite the lower's blocks except the
superblock block."""
import os

from erofs_util import D, E, H, R, S, T0, build, diff, fsck, have_erofs, materialize, mounted, \
    oracle, scan, tar_bytes

from tcmu_obd.format.erofs_read import ErofsReader

BIG = os.urandom(5 * 4096 + 3)


def layer1():
    return [
        E(".", D),
        E("etc", D),
        E("etc/keep", R, b"kept from layer 1\n"),
        E("etc/gone", R, b"whited out\n"),
        E("etc/replaced", R, b"old contents"),
        E("etc/becomes-dir", R, b"a file first"),
        E("etc/link", S, linkname="keep"),
        E("etc/big", R, BIG, uid=7, gid=8),
        E("etc/big-alias", H, linkname="etc/big", uid=7, gid=8),
        E("opq", D, mode=0o750),
        E("opq/old1", R, b"1"),
        E("opq/sub", D),
        E("opq/sub/old2", R, b"2"),
        E("tree", D),
        E("tree/a", D),
        E("tree/a/b", R, b"b"),
        E("was-dir", D),
        E("was-dir/inner", R, b"inner"),
        E("quiet", D),
        E("quiet/bye", R, b"removed without a dir entry in layer 2"),
        E("quiet/stay", R, b"stays"),
    ]


def layer2():
    return [
        E(".", D, mtime=T0 + 1000),
        E("etc", D, mode=0o700, mtime=T0 + 1000, xattrs={"user.new": b"added by layer 2"}),
        E("etc/.wh.gone", R),
        E("etc/replaced", R, b"new contents, longer than before" * 300, mode=0o600),
        E("etc/becomes-dir", D, mtime=T0 + 1000),
        E("etc/becomes-dir/x", R, b"x"),
        E("etc/link", S, linkname="/etc/big"),
        E("etc/big-alias2", H, linkname="etc/big", uid=7, gid=8),   # a new name for a lower inode
        E("etc/fresh", R, b"fresh\n"),
        E("etc/.wh.fresh", R),                      # spares etc/fresh: unpacked earlier in this layer
        E("opq", D, mode=0o755, mtime=T0 + 1000),
        E("opq/.wh..wh..opq", R),
        E("opq/new", R, b"only this is left"),
        E(".wh.tree", R),
        E("was-dir", R, b"a file now"),
        E("quiet/.wh.bye", R),
        E("added", D, mtime=T0 + 1000),
        E("added/deep", S, linkname="../etc/keep"),
    ]


def layer3():
    return [
        E(".", D, mtime=T0 + 2000),
        E("etc", D, mode=0o700, mtime=T0 + 2000),
        E("etc/.wh.big", R),                        # the other names keep the inode
        E("etc/after", R, b"layer 3 data" * 1000),
        E("opq", D, mtime=T0 + 2000),
        E("opq/.wh.new", R),
    ]


def _check_lower_untouched(writes, mappings, lower_img):
    with open(lower_img, "rb") as f:
        disk = f.read()
    used = ErofsReader(lambda o, n: disk[o:o + n]).used_blocks() * 4096
    for off, data in writes:
        assert off == 0 or off >= used, (off, used)
        assert off != 0 or len(data) == 4096
    for off, _length, _toff in mappings:
        assert off >= used, (off, used)


def test_erofs_incremental_layers_merge_like_untar(tmp_path):
    have_erofs()
    tars = [tar_bytes(layer1()), tar_bytes(layer2()), tar_bytes(layer3())]
    lower = None
    for i, tar in enumerate(tars):
        writes, mappings, _b = build(tar, lower)
        if lower is not None:
            _check_lower_untouched(writes, mappings, lower)
        img = materialize(tmp_path / f"l{i + 1}.img", tar, writes, mappings, base=lower)
        want = scan(oracle(tmp_path / f"o{i + 1}", tars[:i + 1]))
        with mounted(img) as mnt:
            got = scan(mnt)
        # "quiet" lost a child in layer 2 without a directory entry: untar's real
        # directory takes the unlink's time, the erofs tree keeps layer 1's
        assert diff(got, want, skip_mtime={"quiet"} if i else ()) == [], f"layer {i + 1}"
        rc, out = fsck(img)
        assert rc == 0, out
        lower = img
    names = scan(oracle(tmp_path / "o3", tars))[0]
    assert "etc/gone" not in names and "etc/fresh" in names and "opq/old1" not in names
    assert names["etc/big-alias"]["nlink"] == 2


def test_erofs_incremental_unchanged_files_keep_their_blocks(tmp_path):
    """An unchanged lower file keeps its raw_blkaddr (its data is mapped by the
    lower layer), so layer 2 maps only its own new files."""
    tar1, tar2 = tar_bytes(layer1()), tar_bytes(layer2())
    w1, m1, _b1 = build(tar1)
    img1 = materialize(tmp_path / "l1.img", tar1, w1, m1)
    w2, m2, _b2 = build(tar2, img1)
    img2 = materialize(tmp_path / "l2.img", tar2, w2, m2, base=img1)
    trees = []
    for img in (img1, img2):
        with open(img, "rb") as f:
            disk = f.read()
        trees.append(ErofsReader(lambda o, n, d=disk: d[o:o + n]).tree())
    t1, t2 = trees
    assert t2.children["etc"].children["big"].blkaddr == t1.children["etc"].children["big"].blkaddr
    assert t2.children["etc"].children["big-alias2"] is t2.children["etc"].children["big"]
    assert t2.children["etc"].children["keep"].blkaddr == t1.children["etc"].children["keep"].blkaddr
    assert len(m2) == 5        # replaced, becomes-dir/x, fresh, opq/new, was-dir
