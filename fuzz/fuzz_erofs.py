#!/usr/bin/env python3
"""Fuzz the erofs reader (tcmu_obd.format.erofs_read.ErofsReader) with
damaged images, and the incremental writer (ErofsBuilder over a lower) with
what the reader accepts.

Run: python fuzz/fuzz_erofs.py -max_total_time=20   (or -runs=N, or a corpus dir)

Structure-aware: at start-up ErofsBuilder makes three small real images
(a mixed tree with xattrs, hard links, devices, short and long symlinks and
a multi-block directory; a deep chain of directories; a second layer over
the first), and mkfs.erofs, when installed, a fourth (compact inodes,
shared xattrs).  The first input byte picks a base; the rest is a list of
splices, each written over the superblock, one inode, or anywhere in the
metadata area (now and then the image is cut short).  The damaged image is
read into a tree; if that works, a builder adds a few entries over it as a
lower, its output is laid over the damaged image and read back, and the
re-read tree must equal the one written.

Only FormatError (from reading) may escape, and UnsupportedError from the
builder when the damaged lower's block numbers leave no room; anything
else, a hang, or a round trip that changes the tree is a finding.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    from tcmu_obd.errors import FormatError, UnsupportedError
    from tcmu_obd.format.erofs import ErofsBuilder, TarEntry
    from tcmu_obd.format.erofs_read import ErofsReader

BS = 4096


def _entries_mixed():
    es = [TarEntry(".", "dir", 0o755), TarEntry("etc", "dir", 0o755, xattrs={"user.d": b"dir"}),
          TarEntry("etc/a", "file", 0o644, 1, 2, 1700000000, 10, data_offset=512,
                   xattrs={"user.a": b"1", "trusted.t": b"x" * 40, "security.s": b""}),
          TarEntry("etc/big", "file", 0o4755, size=3 * BS + 1, data_offset=1024),
          TarEntry("etc/empty", "file"),
          TarEntry("etc/hard", "hardlink", 0o644, linkname="etc/a"),
          TarEntry("etc/short", "symlink", linkname="a"),
          TarEntry("etc/long", "symlink", linkname="/" + "L" * 3000),
          TarEntry("dev", "dir"), TarEntry("dev/null", "char", 0o666, devmajor=1, devminor=3),
          TarEntry("dev/sda", "block", devmajor=8, devminor=70000), TarEntry("dev/p", "fifo"),
          TarEntry("many", "dir")]
    es += [TarEntry(f"many/entry-{i:03d}-" + "m" * 30, "file", size=1, data_offset=2048 + 512 * i)
           for i in range(150)]
    return es


def _entries_deep():
    es, path = [], ""
    for i in range(40):
        path = f"{path}/d{i}" if path else f"d{i}"
        es.append(TarEntry(path, "dir", 0o700 + i % 8, mtime=i))
        es.append(TarEntry(f"{path}/f", "file", size=i, data_offset=512 * i if i else None))
    return es


def _entries_upper():
    return [TarEntry("etc/.wh.a", "file"), TarEntry("etc/new", "file", size=5, data_offset=512),
            TarEntry("many/.wh..wh..opq", "file"), TarEntry("many/x", "symlink", linkname="../etc"),
            TarEntry("etc/hard2", "hardlink", linkname="etc/big")]


def _build(entries, lower=None):
    b = ErofsBuilder(lower=lower, name="base")
    for e in entries:
        b.add(e)
    writes, _maps = b.finish()
    return writes, b.end_block


def _lay(disk, writes, end_block):
    disk = bytearray(disk)
    if len(disk) < end_block * BS:
        disk += bytes(end_block * BS - len(disk))
    for off, data in writes:
        disk[off:off + len(data)] = data
    return disk


def _overlay(disk, writes, size):
    """pread over `disk` with `writes` laid on top, zeros up to `size` (a
    damaged lower may put the new metadata far beyond the image's bytes)."""
    layers = [(0, disk)] + list(writes)

    def pread(off, n):
        n = max(0, min(n, size - off))
        buf = bytearray(n)
        for woff, data in layers:
            lo, hi = max(off, woff), min(off + n, woff + len(data))
            if lo < hi:
                buf[lo - off:hi - off] = data[lo - woff:hi - woff]
        return bytes(buf)
    return pread


def _regions(disk):
    r = ErofsReader(lambda o, n: disk[o:o + n])
    regs = [(1024, 128), (r.meta_blkaddr * BS, len(disk) - r.meta_blkaddr * BS)]
    stack = [r.tree()]
    while stack:
        node = stack.pop()
        regs.append((r.meta_blkaddr * BS + node.nid * 32, 64))
        if node.is_dir:
            stack.extend(node.children.values())
    return regs


BASES = []
_w, _end = _build(_entries_mixed())
_mixed = bytes(_lay(b"", _w, _end))
_w, _end = _build(_entries_deep())
BASES.append(bytes(_lay(b"", _w, _end)))
BASES.append(_mixed)
_w, _end = _build(_entries_upper(), lower=lambda o, n: _mixed[o:o + n])
BASES.append(bytes(_lay(_mixed, _w, _end)))

def _mkfs_base():
    """An image by mkfs.erofs (compact inodes, shared xattrs, meta_blkaddr 0),
    when erofs-utils is installed."""
    if shutil.which("mkfs.erofs") is None:
        return None
    tmp = tempfile.mkdtemp(prefix="fuzz_erofs_")
    try:
        src = os.path.join(tmp, "src")
        os.makedirs(os.path.join(src, "d", "e"))
        for i in range(30):
            with open(os.path.join(src, "d", f"f{i:02d}" + "_" * 20), "wb") as f:
                f.write(b"%d" % i * (i * 97))
            os.setxattr(os.path.join(src, "d", f"f{i:02d}" + "_" * 20), "user.shared", b"same value")
        os.symlink("d/f01" + "_" * 20, os.path.join(src, "sl"))
        os.link(os.path.join(src, "d", "f02" + "_" * 20), os.path.join(src, "d", "e", "hard"))
        img = os.path.join(tmp, "img")
        subprocess.run(["mkfs.erofs", "--quiet", "-x1", "-Enoinline_data", "-T", "1700000000", img, src],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(img, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(tmp, True)


_m = _mkfs_base()
if _m is not None:
    BASES.append(_m)
BASES = [(d, _regions(d)) for d in BASES]


def _damage(data):
    fdp = atheris.FuzzedDataProvider(data)
    disk, regs = BASES[fdp.ConsumeIntInRange(0, len(BASES) - 1)]
    disk = bytearray(disk)
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        if fdp.remaining_bytes() < 3:
            break
        start, span = regs[fdp.ConsumeIntInRange(0, len(regs) - 1)]
        off = start + fdp.ConsumeIntInRange(0, max(0, span - 1))
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
        disk[off:off + len(chunk)] = chunk
    if fdp.ConsumeIntInRange(0, 15) == 0:
        del disk[fdp.ConsumeIntInRange(0, len(disk)):]
    return bytes(disk)


def _flat(root):
    """{path: attributes} of a tree; a hard link names the first path of its inode."""
    out, first, stack = {}, {}, [("", root)]
    while stack:
        path, node = stack.pop()
        first[id(node)] = min(first.get(id(node), path), path)
        out[path] = node
        if node.is_dir:
            stack.extend((f"{path}/{n}", c) for n, c in node.children.items())
    return {path: (node.mode, node.uid, node.gid, node.mtime, node.mtime_nsec, sorted(node.xattrs.items()),
                   node.target, node.rdev, None if node.is_dir else node.size,
                   node.blkaddr if node.size else None, first[id(node)])
            for path, node in out.items()}


def _exercise(disk):
    def read(o, n):
        assert o % 4096 == 0 and n == 4096, (o, n)
        return disk[o:o + n]
    r = ErofsReader(read, name="fuzz")
    r.tree()
    used = r.used_blocks()
    assert used >= 1
    b = ErofsBuilder(lower=read, name="fuzz")
    b.add(TarEntry("fuzz-new", "file", size=100, data_offset=512))
    try:
        writes, maps = b.finish()
    except UnsupportedError:
        return
    for off, data in writes:
        assert off == 0 or off >= used * BS, (off, used)
    for off, _n, _t in maps:
        assert off >= used * BS
    again = ErofsReader(_overlay(disk, writes, b.end_block * BS), name="rebuilt").tree()
    assert _flat(again) == _flat(b.root)


def TestOneInput(data):
    try:
        _exercise(_damage(data))
    except FormatError as e:
        assert str(e).startswith("fuzz: ") or str(e).startswith("fuzz (lower): "), e


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
