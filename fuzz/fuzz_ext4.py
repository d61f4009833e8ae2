#!/usr/bin/env python3
"""Fuzz the read-only ext4 reader (tcmu_obd.format.ext4.Ext4) with damaged disks.

Run: python fuzz/fuzz_ext4.py -max_total_time=20   (or -runs=N, or a corpus dir)

Structure-aware: at start-up mkfs.ext4 -d builds four small real file
systems (1 KiB blocks with extents and a depth-1 extent tree, 4 KiB blocks
with 64bit descriptors, an ext2-style one with indirect block maps, and one
with inline data),
each holding files, nested and hash-indexed directories, fast and slow
symlinks, a symlink loop and a sparse file.  The first input byte picks a
base; the rest is a list of splices, each written over one of the base's
metadata regions (superblock, group descriptors, inode tables, directory,
extent and indirect blocks) or anywhere on the disk.  The damaged disk is
then opened, walked, and every file is looked up, mapped and read
(now and then on a truncated disk).

Only FormatError may escape; anything else (or a hang) is a finding.  Every
range file_extents() returns must lie inside the disk.
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    from tcmu_obd.format import ext4
    from tcmu_obd.errors import FormatError

PATHS = ["/", "/small.txt", "/a/b/big.bin", "/a/b/c/deep.txt", "/fastlink", "/slowlink",
         "/a/clink/deep.txt", "/loop1", "/many/n17" + "_" * 24, "/sparse.bin", "/a/../small.txt", "/nope"]


def _build(tmp, name, size, opts):
    src = os.path.join(tmp, "src")
    if not os.path.isdir(src):
        os.makedirs(os.path.join(src, "a", "b", "c"))
        os.makedirs(os.path.join(src, "many"))
        os.makedirs(os.path.join(src, "L" * 70))
        with open(os.path.join(src, "small.txt"), "wb") as f:
            f.write(b"small\n")
        with open(os.path.join(src, "a", "b", "c", "deep.txt"), "wb") as f:
            f.write(b"deep\n" * 50)
        with open(os.path.join(src, "L" * 70, "t"), "wb") as f:
            f.write(b"t" * 3000)
        for i in range(12):
            with open(os.path.join(src, "a", f"frag{i}"), "wb") as f:
                f.write(bytes([i]) * 2048)
        for i in range(80):
            with open(os.path.join(src, "many", f"n{i:02d}" + "_" * 24), "wb") as f:
                f.write(b"%d\n" % i)
        with open(os.path.join(src, "sparse.bin"), "wb") as f:
            f.write(b"s" * 1500)
            f.seek(40000)
            f.write(b"e" * 1500)
        os.symlink("small.txt", os.path.join(src, "fastlink"))
        os.symlink("/" + "L" * 70 + "/t", os.path.join(src, "slowlink"))
        os.symlink("b/c", os.path.join(src, "a", "clink"))
        os.symlink("loop2", os.path.join(src, "loop1"))
        os.symlink("loop1", os.path.join(src, "loop2"))
        with open(os.path.join(tmp, "big"), "wb") as f:
            f.write(bytes(range(256)) * 1120)          # 280 KiB: double indirect with 1 KiB blocks
    raw = os.path.join(tmp, name)
    with open(raw, "wb") as f:
        f.truncate(size)
    done = subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "160", *opts, "-d", src, raw],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"mkfs.ext4 {' '.join(opts)} failed: {done.stderr}")
    cmds = [f"rm /a/frag{i}" for i in range(0, 12, 2)] + [f"write {tmp}/big /a/b/big.bin"]
    script = raw + ".cmds"
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")
    subprocess.run(["debugfs", "-w", "-f", script, raw], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["e2fsck", "-fyD", raw], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(raw, "rb") as f:
        return f.read()


def _regions(disk):
    """Byte ranges of the metadata the reader parses."""
    fs = ext4.Ext4(lambda o, n: disk[o:o + n], len(disk), "base")
    bs = fs.block_size
    regs = [(1024, 1024), ((fs.first_data_block + 1) * bs, bs)]
    for g in range(fs.group_count):
        t = fs.inode_table(g)
        regs.append((t * bs, min(32, fs.inodes_per_group) * fs.inode_size))
    seen = set()
    for path in PATHS + [p for p, _i in fs.walk("/")] + ["/a", "/a/b", "/many"]:
        ino = fs.lookup(path, follow=False)
        if ino is None or ino in seen:
            continue
        seen.add(ino)
        node = fs.inode(ino)
        regs.append((node.disk_offset, fs.inode_size))
        if node.is_dir:
            for off, n in fs.inode_extents(node):
                regs.append((off, n))
        ptrs = struct.unpack_from("<15I", node.iblock)
        if node.flags & ext4.INODE_FL_EXTENTS:
            if struct.unpack_from("<H", node.iblock, 6)[0] > 0:
                for k in range(struct.unpack_from("<H", node.iblock, 2)[0]):
                    lo, hi = struct.unpack_from("<IH", node.iblock, 12 + 12 * k + 4)
                    regs.append(((hi << 32 | lo) * bs, bs))
        elif not node.is_symlink:
            for p in ptrs[12:]:
                if p:
                    regs.append((p * bs, bs))
    return regs


_TMP = tempfile.mkdtemp(prefix="fuzz_ext4_")   # only while building: the images are kept in memory
BASES = []
for _name, _size, _opts in [
        ("k1.raw", 1 << 20, ["-b", "1024", "-O", "^has_journal"]),
        ("k4.raw", 1 << 20, ["-b", "4096", "-O", "^has_journal,64bit"]),
        ("ext2.raw", 1 << 20, ["-b", "1024", "-O", "^has_journal,^extent,^64bit,^flex_bg"]),
        ("inline.raw", 1 << 20, ["-b", "4096", "-I", "512", "-O", "^has_journal,inline_data"])]:
    try:
        _disk = _build(_TMP, _name, _size, _opts)
    except BaseException:
        shutil.rmtree(_TMP, True)
        raise
    BASES.append((_disk, _regions(_disk)))
shutil.rmtree(_TMP, True)


def _damage(data):
    fdp = atheris.FuzzedDataProvider(data)
    disk, regs = BASES[fdp.ConsumeIntInRange(0, len(BASES) - 1)]
    disk = bytearray(disk)
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        if fdp.remaining_bytes() < 3:
            break
        pick = fdp.ConsumeIntInRange(0, len(regs))
        if pick == len(regs):
            start, span = 0, len(disk)
        else:
            start, span = regs[pick]
        off = start + fdp.ConsumeIntInRange(0, max(0, span - 1))
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
        disk[off:off + len(chunk)] = chunk
    if fdp.ConsumeIntInRange(0, 15) == 0:              # now and then a truncated disk: short reads
        del disk[fdp.ConsumeIntInRange(0, len(disk)):]
    return bytes(disk)


def _exercise(disk):
    size = len(disk)

    def read(o, n):
        assert o >= 0 and n >= 0 and o % 512 == 0 and n % 512 == 0, (o, n)
        return disk[o:o + n]
    fs = ext4.Ext4(read, size, "fuzz")
    for path, ino in fs.walk("/"):
        for off, n in fs.inode_extents(ino):
            assert 0 <= off and off + n <= size, (path, off, n)
        fs.read_inode_data(ino, limit=1 << 20)
    for path in PATHS:
        ino = fs.lookup(path)
        if ino is None:
            continue
        node = fs.inode(ino)
        for off, n in fs.inode_extents(node):
            assert 0 <= off and off + n <= size, (path, off, n)
        if node.is_dir:
            fs.listdir(node)
        else:
            assert len(fs.read_inode_data(node, limit=1 << 20)) <= 1 << 20
        link = fs.lookup(path, follow=False)
        if link is not None and fs.inode(link).is_symlink:
            fs.readlink(link)
    ext4.superblock(read)


def TestOneInput(data):
    try:
        _exercise(_damage(data))
    except FormatError as e:
        assert str(e).startswith("fuzz: "), e


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
