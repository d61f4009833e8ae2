"""overlaybd-apply's untar on the real kernel ext4 (FUSE file + loop device,
root only): three layers holding every entry kind (files, directories,
symlinks absolute and relative, hard links also across layers, fifos,
character and block devices, setuid modes, owners, xattrs from PAX
SCHILY.xattr.* with binary values, long GNU and PAX names and link names,
fractional PAX mtimes), whiteouts (files, directories, an opaque directory
before and after new entries, a whiteout of a path unpacked earlier in the
same layer), replacements (file <-> directory, symlink <-> file, directory
over directory), symlinked parents (followed inside the root; an escape
attempt stays inside), applied as plain tar from a path, gzip through the
CLI, and zstd through a FIFO.  The mounted tree is compared, path by path,
with an in-memory model of the same layers written here (Model): types,
modes, owners, sizes, content hashes, link targets, device numbers, xattrs,
mtimes (where known) and hard-link groups.

The model (also used by tests/test_convert_*.py) is deliberately simple: a
dict of normalized paths -> shared Node objects, with the semantics of
overlaybd's libtar/whiteout.cpp spelled out directly."""
import gzip
import hashlib
import json
import os
import posixpath
import re
import stat
import subprocess
import sys
import tarfile
import threading

import pytest

from tar_tree import B, C, D, E, F, H, R, S, T0, tar_bytes, walk  # noqa: F401 -- other tests import them from here
from tcmu_obd.build import apply
from tcmu_obd.image import assemble, baselayer
from tcmu_obd.serve import blockdev, fuse
from tcmu_obd.image.rw import RWLayer

GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPLY_CLI = [sys.executable, "-m", "tcmu_obd.cli.apply"]


def missing():
    problems = blockdev.fuse_problems(("losetup", "mount", "umount", "mkfs.ext4", "e2fsck", "fusermount3"))
    return "; ".join(p for p, _ in problems) or None


pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

# -- building layers -------------------------------------------------------------------------------

# -- the model ---------------------------------------------------------------------------------------

class Node:
    def __init__(self, kind, mode=0o755, uid=0, gid=0, mtime=None):
        self.kind, self.mode, self.uid, self.gid, self.mtime = kind, mode, uid, gid, mtime
        self.data = b""
        self.target = ""
        self.rdev = (0, 0)
        self.xattrs = {}


def _ns_of(kw):
    if "pax_mtime" in kw:
        whole, _, frac = kw["pax_mtime"].partition(".")
        return int(whole) * 10**9 + int((frac + "0" * 9)[:9])
    return kw.get("mtime", T0) * 10**9


class Model:
    """The expected tree: {rel path: Node}; "" is the root.  Starts as the
    empty ext4 of the base layer (a root and lost+found)."""

    def __init__(self):
        self.t = {"": Node("dir"), "lost+found": Node("dir", 0o700)}

    # paths
    def children(self, rel):
        pre = rel + "/" if rel else ""
        return [p for p in self.t if p != rel and p.startswith(pre) and "/" not in p[len(pre):]]

    def touch(self, rel):
        """A child of directory rel was added or removed: its mtime changed."""
        self.t[rel].mtime = None

    def resolve(self, rel, create):
        done, todo, links = [], [c for c in rel.split("/") if c], 0
        while todo:
            c = todo.pop(0)
            if c == "..":
                if done:
                    done.pop()
                continue
            if c == ".":
                continue
            p = "/".join(done + [c])
            node = self.t.get(p)
            if node is None:
                assert create, p
                self.t[p] = Node("dir", 0o755)
                self.touch("/".join(done))
                done.append(c)
            elif node.kind == "sym":
                links += 1
                assert links < 40
                if node.target.startswith("/"):
                    done = []
                todo = [x for x in node.target.split("/") if x] + todo
            else:
                assert node.kind == "dir", p
                done.append(c)
        return "/".join(done)

    def delete(self, rel):
        for p in [p for p in self.t if p == rel or p.startswith(rel + "/")]:
            del self.t[p]
        self.touch(posixpath.dirname(rel))

    def remove_all(self, rel, unpacked, rmdir=True):
        node = self.t.get(rel)
        if node is None:
            return
        if node.kind != "dir":
            if rel not in unpacked:
                del self.t[rel]
                self.touch(posixpath.dirname(rel))
            return
        for child in self.children(rel):
            self.remove_all(child, unpacked)
        if rmdir and rel not in unpacked and not self.children(rel):
            del self.t[rel]
            self.touch(posixpath.dirname(rel))

    # layers
    def apply(self, entries):
        unpacked, dirs = set(), []
        for name, kind, data, kw in entries:
            rel = posixpath.normpath("/" + name).lstrip("/")
            parent, base = posixpath.split(rel)
            if kind == D and not base:
                path = ""
            else:
                parent = self.resolve(parent, True)
                if base == ".wh..wh..opq":
                    self.remove_all(parent, unpacked, rmdir=False)
                    continue
                if base.startswith(".wh..wh."):
                    continue
                if base.startswith(".wh."):
                    self.remove_all(posixpath.join(parent, base[4:]), unpacked)
                    continue
                path = posixpath.join(parent, base) if parent else base
            old = self.t.get(path)
            if old is not None and not (old.kind == "dir" and kind == D):
                self.delete(path)
            if kind == D:
                node = self.t.get(path) or Node("dir")
            elif kind == H:
                tp, tb = posixpath.split(posixpath.normpath("/" + kw["linkname"]).lstrip("/"))
                node = self.t[posixpath.join(self.resolve(tp, False), tb).lstrip("/")]
            else:
                node = Node({R: "reg", S: "sym", C: "chr", B: "blk", F: "fifo"}[kind])
                node.data = data if kind == R else b""
                node.target = kw.get("linkname", "") if kind == S else ""
                node.rdev = (kw.get("devmajor", 0), kw.get("devminor", 0)) if kind in (C, B) else (0, 0)
            if path not in self.t:
                self.touch(posixpath.dirname(path))
            self.t[path] = node
            for k, v in kw.get("xattrs", {}).items():
                if node.kind == "sym" and k.startswith("user."):
                    continue          # EPERM on symlinks: ignored by the apply
                node.xattrs[k] = v
            node.uid, node.gid = kw.get("uid", 0), kw.get("gid", 0)
            if node.kind != "sym":
                node.mode = kw.get("mode", 0o755 if kind == D else 0o644) & 0o7777
            if kind == D:
                dirs.append((path, _ns_of(kw)))
            else:
                node.mtime = _ns_of(kw)
            unpacked.add(path)
        for path, mtime in dirs:
            if path in self.t and self.t[path].kind == "dir":
                self.t[path].mtime = mtime


# -- comparing a mounted tree with the model -------------------------------------------------------------

def scan(root):
    """{rel: (kind, mode, uid, gid, size, sha or target, rdev, xattrs, mtime_ns, ino)}"""
    out = {}
    for rel, st, kind, body, xattrs in walk(root):
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else (0, 0)
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    st.st_size if kind in ("reg", "sym") else 0, body, rdev, xattrs,
                    st.st_mtime_ns, st.st_ino)
    return out


def compare(model, root):
    got = scan(root)
    want_paths = set(model.t)
    assert sorted(set(got) - want_paths) == [], "unexpected paths in the image"
    assert sorted(want_paths - set(got)) == [], "paths missing from the image"
    problems = []
    for rel, node in sorted(model.t.items()):
        kind, mode, uid, gid, size, body, rdev, xattrs, mtime, _ino = got[rel]
        if rel in ("", "lost+found") and node.mtime is None:
            if kind != "dir":
                problems.append((rel, "kind", kind))
            continue
        want_body = {"reg": hashlib.sha256(node.data).hexdigest(), "sym": node.target}.get(node.kind, "")
        want_size = len(node.data) if node.kind == "reg" else len(node.target.encode()) if node.kind == "sym" else 0
        checks = [("kind", kind, node.kind), ("uid", uid, node.uid), ("gid", gid, node.gid),
                  ("size", size, want_size), ("content", body, want_body), ("rdev", rdev, node.rdev),
                  ("xattrs", xattrs, node.xattrs)]
        if node.kind != "sym":
            checks.append(("mode", oct(mode), oct(node.mode)))
        if node.mtime is not None:
            checks.append(("mtime", mtime, node.mtime))
        problems += [(rel, what, a, b) for what, a, b in checks if a != b]
    assert problems == []
    # hard-link groups: same inode in the image <=> the same Node in the model
    by_ino, by_node = {}, {}
    for rel, node in model.t.items():
        if node.kind != "dir":
            by_node.setdefault(id(node), set()).add(rel)
            by_ino.setdefault(got[rel][9], set()).add(rel)
    assert sorted(map(sorted, by_ino.values())) == sorted(map(sorted, by_node.values()))
    return len(got)


# -- the layers --------------------------------------------------------------------------------------------

LONG_DIR = "deep/" + "/".join(["d" * 60] * 3)          # > 100 characters
LONG_TARGET = "/" + "t" * 150
BIG = os.urandom(1 << 20) * 3 + b"tail"                  # several copy chunks


def layer1():
    return [
        E("./", D, mode=0o755, mtime=T0 - 5),
        E("etc", D), E("etc/passwd", R, b"root:x:0:0\n", mtime=T0 + 1),
        E("etc/passwd.hl", H, linkname="etc/passwd", mtime=T0 + 1),
        E("usr/bin/tool", R, b"\x7fELF" + b"x" * 5000, mode=0o4755, uid=0, gid=50),
        E("usr/bin/rel", S, linkname="tool", mtime=T0 + 2),
        E("lnk_abs", S, linkname="/etc/passwd"),
        E("real", D, mode=0o750, mtime=T0 + 3), E("dlink", S, linkname="real"),
        E("opq", D), E("opq/a", R, b"a"), E("opq/b", R, b"b"), E("opq/sub", D), E("opq/sub/c", R, b"c"),
        E("opq2", D), E("opq2/old", R, b"old"),
        E("wh", D), E("wh/x", R, b"x"), E("wh/y", R, b"y"), E("wh/dir", D), E("wh/dir/z", R, b"z"),
        E("wh/dir/hl", H, linkname="wh/x"),
        E("rep", D), E("rep/file2dir", R, b"f"), E("rep/dir2file", D), E("rep/dir2file/child", R, b"c"),
        E("rep/sym2file", S, linkname="nowhere"), E("rep/file2sym", R, b"f2s"),
        E("keep", D, mode=0o755, mtime=T0 + 4), E("keep/k", R, b"k"),
        E("data/big", R, BIG, mtime=T0 + 5), E("data/empty", R, b""),
        E("run/fifo", F, mode=0o600), E("dev/null", C, mode=0o666, devmajor=1, devminor=3),
        E("dev/loop200", B, mode=0o660, devmajor=7, devminor=200, gid=6),
        E("home/user", D, mode=0o700, uid=1000, gid=1000, mtime=T0 + 6),
        E("home/user/secret", R, b"s3cret", mode=0o600, uid=1000, gid=1000),
        E("xa/file", R, b"with xattrs", xattrs={"user.test": b"value", "trusted.bin": b"\x00\xff\x80\x01"}),
        E("xa/dir", D, xattrs={"user.dir": b"d"}),
        E("xa/sym", S, linkname="file", xattrs={"user.ignored": b"on a symlink: EPERM"}),
        E(LONG_DIR + "/long-file-name-" + "n" * 80, R, b"long name"),
        E("longlink", S, linkname=LONG_TARGET),
        E("frac", R, b"fractional mtime", pax_mtime="1700000000.123456789"),
        E("ünïcode name.txt", R, "unicode".encode()),
    ]


def layer2():
    return [
        E("opq", D, mtime=T0 + 10), E("opq/.wh..wh..opq", R), E("opq/new", R, b"new"),
        E("opq2/n", R, b"n"), E("opq2/.wh..wh..opq", R),         # marker after a new entry: n stays
        E("wh/.wh.x", R), E("wh/.wh.dir", R),
        E("keep/newfile", R, b"nf"), E("keep/.wh.newfile", R),    # unpacked earlier in the layer: stays
        E("keep", D, mode=0o700, mtime=T0 + 11),                  # dir over dir: children kept
        E("rep/file2dir", D), E("rep/file2dir/inner", R, b"i"),
        E("rep/dir2file", R, b"now a file"), E("rep/sym2file", R, b"now a file too"),
        E("rep/file2sym", S, linkname="../etc/passwd"),
        E("dlink/inside", R, b"through a symlinked parent"),
        E("esc", S, linkname="../../../../../outside"), E("esc/pwned", R, b"stays inside the root"),
        E("../../dotdot", R, b"normalized to the root"),
        E("usr/bin/tool.hl", H, linkname="usr/bin/tool", mode=0o4755, gid=50),
        E("etc/.wh..wh.plnk.123", R),                             # whiteout meta file: ignored
        E("etc/passwd", R, b"root:x:0:0:new\n", mtime=T0 + 12),   # passwd.hl keeps the old inode
        E("data/big", R, BIG[::-1], mtime=T0 + 13),
    ]


def layer3():
    return [
        E("wh/.wh.y", R),
        E("home/.wh.user", R),
        E(LONG_DIR + "/gnu-" + "g" * 120, R, b"GNU long name"),
        E("gnulink", S, linkname="/" + "l" * 120),
        E("xa/file", R, b"replaced: xattrs gone"),
        E("newdir/sub", D, mode=0o711, mtime=T0 + 20), E("newdir/sub/f", R, b"f", uid=7, gid=8),
        E("dev/null", C, mode=0o666, devmajor=1, devminor=5),
    ]


# -- fixtures ------------------------------------------------------------------------------------------------

def new_image(tmp, lowers=(), vsize=64 * GiB, sparse=False, name="up"):
    data, index = os.path.join(tmp, name + ".data"), os.path.join(tmp, name + ".index")
    RWLayer.create(data, index, vsize, sparse=sparse).close()
    cfg = os.path.join(tmp, name + ".json")
    with open(cfg, "w") as f:
        json.dump({"lowers": [{"file": p} for p in lowers], "upper": {"data": data, "index": index}}, f)
    return cfg, data, index


def mount_ro(cfg_path, tmp):
    """Context manager: the image of cfg_path mounted read-only (through the
    frontend blockdev picks: TCMU in the qemu guest); yields the mount point."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        with blockdev.image_device(cfg_path, lambda: assemble.open_image(cfg_path), tmp,
                                   read_only=True) as d, \
                apply.mounted(d.path, os.path.join(tmp, "ro"), read_only=True) as mnt:
            yield mnt
    return cm()


def cli(*args, input=None, check=True):
    p = subprocess.run(APPLY_CLI + [str(a) for a in args], capture_output=True, timeout=120,
                       cwd=ROOT, input=input)
    if check and p.returncode:
        raise AssertionError(f"{args}: exit {p.returncode}\n{p.stderr.decode()}")
    return p


# -- the tests --------------------------------------------------------------------------------------------

def test_three_layers_match_the_model(tmp_path):
    import zstandard
    tmp = str(tmp_path)
    cfg, data, _ = new_image(tmp, [baselayer.path()])
    model = Model()
    l1, l2, l3 = layer1(), layer2(), layer3()

    # layer 1: plain tar, from a path, through the library, with the right checksum
    t1 = tar_bytes(l1)
    p1 = os.path.join(tmp, "l1.tar")
    with open(p1, "wb") as f:
        f.write(t1)
    res = apply.apply_layer(p1, cfg, checksum="sha256:" + hashlib.sha256(t1).hexdigest())
    assert res.entries == len(l1) and res.tar_bytes == len(t1) and res.compression == "none"
    model.apply(l1)

    # layer 2: gzip, through the CLI, on stdin
    t2 = tar_bytes(l2)
    p = cli("--checksum", "sha256:" + hashlib.sha256(t2).hexdigest(), "-", cfg,
            input=gzip.compress(t2))
    assert b"gzip" in p.stderr and hashlib.sha256(t2).hexdigest().encode() in p.stderr
    model.apply(l2)

    # layer 3: zstd, GNU format (long names as 'L'/'K' entries), through a FIFO
    t3 = tar_bytes(l3, tarfile.GNU_FORMAT)
    fifo = os.path.join(tmp, "l3.fifo")
    os.mkfifo(fifo)
    zdata = zstandard.ZstdCompressor().compress(t3)
    writer = threading.Thread(target=lambda: open(fifo, "wb").write(zdata))
    writer.start()
    p = cli(fifo, cfg)
    writer.join()
    assert b"zstd" in p.stderr and hashlib.sha256(t3).hexdigest().encode() in p.stderr
    model.apply(l3)

    with mount_ro(cfg, tmp) as mnt:
        n = compare(model, mnt)
        assert os.path.isfile(os.path.join(mnt, "outside/pwned"))      # the escape stayed inside
        assert os.path.isfile(os.path.join(mnt, "real/inside"))
        assert open(os.path.join(mnt, "etc/passwd.hl"), "rb").read() == b"root:x:0:0\n"
    assert n > 40
    assert not os.path.exists("/outside/pwned") and not os.path.exists("/dotdot")


def test_mkfs_on_an_empty_upper_and_raw(tmp_path):
    """--mkfs makes overlaybd's ext4 (no journal, 4 KiB blocks, 256-byte inodes) on a
    layer with no lowers; --raw applies onto a plain image file."""
    tmp = str(tmp_path)
    cfg, _, _ = new_image(tmp, vsize=64 << 20)
    entries = [E("hello", R, b"world"), E("d", D, mode=0o700), E("d/l", S, linkname="../hello")]
    p = os.path.join(tmp, "l.tar")
    with open(p, "wb") as f:
        f.write(tar_bytes(entries))
    cli("--mkfs", p, cfg)
    model = Model()
    model.apply(entries)
    with mount_ro(cfg, tmp) as mnt:
        compare(model, mnt)
        sb = subprocess.run(["dumpe2fs", "-h", apply_dev(mnt)], capture_output=True, text=True).stdout
    assert "has_journal" not in sb
    assert re.search(r"Block size:\s+4096", sb) and re.search(r"Inode size:\s+256", sb), sb

    raw = os.path.join(tmp, "raw.img")
    with open(raw, "wb") as f:
        f.truncate(32 << 20)
    cli("--raw", "--mkfs", p, raw)
    out = subprocess.run(["debugfs", "-R", "cat /hello", raw], capture_output=True)
    assert out.stdout == b"world"


def apply_dev(mnt):
    m = fuse.mount_at(mnt)
    return m[1]
