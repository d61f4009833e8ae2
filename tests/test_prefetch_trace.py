"""Tests of tcmu_obd.remote.prefetch (trace record / replay / file-list prefetch,
docs/runtime.md, Trace and prefetch) and of the read-only ext4 reader in tcmu_obd.format.ext4.

The file systems are real: mkfs.ext4 -d populates a sparse raw disk from a
directory, debugfs fragments it, and the raw disk becomes overlaybd layers
(a base layer plus a top layer holding the blocks a second debugfs session
changed).  Oracles are independent of the code under test: the source tree's
bytes, debugfs's block lists, and the per-layer LSMT indexes looked up
sector by sector."""
import json
import os
import shutil
import struct
import subprocess
import threading

import pytest

from tcmu_obd.image import assemble
from tcmu_obd.format import ext4
from tcmu_obd.remote import prefetch, trace
from tcmu_obd.errors import FormatError
from tcmu_obd.image.rw import RWLayer

from conftest import commit_layer, make_layer

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
                                reason="e2fsprogs is not installed")

SECTOR = 512
DISK = 16 << 20
LONG_DIR = "d" * 70                          # a symlink to it is a slow (block) symlink


def run(*cmd, ok=(0,)):
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode in ok, (cmd, p.returncode, p.stdout[-2000:], p.stderr[-2000:])


def debugfs(raw, *cmds, write=True):
    script = raw + ".cmds"
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")
    args = ["debugfs"] + (["-w"] if write else []) + ["-f", script, raw]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def rnd(n, seed):
    import random
    return random.Random(seed).randbytes(n)


def make_tree(src):
    os.makedirs(f"{src}/a/b/c", exist_ok=True)
    os.makedirs(f"{src}/many", exist_ok=True)
    os.makedirs(f"{src}/{LONG_DIR}", exist_ok=True)
    files = {
        "small.txt": rnd(100, 1),
        "a/mid.bin": rnd(70000, 2),
        "a/b/c/deep.txt": b"deep file\n" * 30,
        f"{LONG_DIR}/target.bin": rnd(5000, 3),
        "empty": b"",
    }
    os.makedirs(f"{src}/few", exist_ok=True)         # with inline_data: entries spill into system.data
    for i in range(4):
        files[f"few/file_nr_{i}"] = rnd(20 + 40 * i, 50 + i)
    for i in range(40):
        files[f"a/frag{i:02d}"] = rnd(8192, 100 + i)
    for i in range(300):
        files[f"many/entry_with_a_long_name_{i:04d}"] = f"{i}\n".encode()
    for rel, data in files.items():
        with open(f"{src}/{rel}", "wb") as f:
            f.write(data)
    with open(f"{src}/sparse.bin", "wb") as f:       # data, hole, data
        f.write(rnd(3000, 4))
        f.seek(200 * 1024)
        f.write(rnd(5000, 5))
    files["sparse.bin"] = open(f"{src}/sparse.bin", "rb").read()
    os.symlink("small.txt", f"{src}/fastlink")
    os.symlink(f"/{LONG_DIR}/target.bin", f"{src}/slowlink")
    os.symlink("b/c", f"{src}/a/clink")
    os.symlink("loop2", f"{src}/loop1")
    os.symlink("loop1", f"{src}/loop2")
    return files


def make_fs(raw, src, *opts, size=DISK):
    with open(raw, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", *opts, "-d", src, raw)


def fragment(raw, files):
    """Free every other 8 KiB file, then write a big file into the gaps: an
    extent tree of depth >= 1 (more than the 4 extents the inode holds)."""
    big = rnd(300000, 6)
    path = raw + ".big"
    with open(path, "wb") as f:
        f.write(big)
    debugfs(raw, *[f"rm /a/frag{i:02d}" for i in range(0, 40, 2)], f"write {path} /a/b/big.bin")
    for i in range(0, 40, 2):
        del files[f"a/frag{i:02d}"]
    files["a/b/big.bin"] = big


def data_extents(path):
    """(offset, length) of the data in a sparse file (SEEK_DATA / SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end, off, out = os.fstat(fd).st_size, 0, []
        while off < end:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, off, os.SEEK_HOLE)
            out.append((off, hole - off))
            off = hole
        return out
    finally:
        os.close(fd)


def layer_from(raw, out, base=None, vsize=DISK):
    """Commit the raw disk's data (or, with base, only the 4 KiB blocks that
    differ from base) into an overlaybd layer."""
    up = RWLayer.create(out + ".data", out + ".index", vsize)
    with open(raw, "rb") as f:
        if base is None:
            for off, n in data_extents(raw):
                pos = off
                while pos < off + n:
                    k = min(1 << 20, off + n - pos)
                    f.seek(pos)
                    up.write(f.read(k), pos)
                    pos += k
        else:
            with open(base, "rb") as g:
                for pos in range(0, vsize, 4096):
                    f.seek(pos)
                    g.seek(pos)
                    a, b = f.read(4096), g.read(4096)
                    if a != b:
                        up.write(a, pos)
    commit_layer(up, out)
    up.close()
    return out


@pytest.fixture(scope="module")
def fsimg(tmp_path_factory):
    """Two committed layers holding one ext4 file system, and the expected files."""
    tmp = str(tmp_path_factory.mktemp("ext4img"))
    src = os.path.join(tmp, "src")
    files = make_tree(src)
    raw_a = os.path.join(tmp, "a.raw")
    make_fs(raw_a, src, "-N", "1024")
    fragment(raw_a, files)
    run("e2fsck", "-fyD", raw_a, ok=(0, 1))                   # hash-index the big directories
    raw_b = os.path.join(tmp, "b.raw")
    shutil.copyfile(raw_a, raw_b)
    top = rnd(40000, 7)
    with open(os.path.join(tmp, "top.bin"), "wb") as f:
        f.write(top)
    debugfs(raw_b, "mkdir /top", f"write {tmp}/top.bin /top/new.bin")
    files["top/new.bin"] = top
    base = layer_from(raw_a, os.path.join(tmp, "base.commit"))
    upper = layer_from(raw_b, os.path.join(tmp, "top.commit"), base=raw_a)
    return {"tmp": tmp, "src": src, "files": files, "raw": raw_b, "layers": [base, upper]}


def write_config(tmp, name, lowers, **extra):
    cfg = {"lowers": [{"file": p} if isinstance(p, str) else p for p in lowers],
           "resultFile": os.path.join(tmp, name + ".result")}
    cfg.update(extra)
    path = os.path.join(tmp, name + ".json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def open_fs(image):
    return ext4.Ext4(image.read, image.virtual_size, "image")


class CountingBacking:
    """Stands in for a layer's backing: records every pread."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []
        self._lock = threading.Lock()

    @property
    def size(self):
        return self.inner.size

    def pread(self, offset, length):
        with self._lock:
            self.calls.append((offset, length))
        return self.inner.pread(offset, length)


def count_backings(image):
    wrappers = []
    for layer in image.lowers:
        layer.backing = CountingBacking(layer.backing)
        wrappers.append(layer.backing)
    return wrappers


def sectors_of(ranges):
    out = set()
    for li, off, n in ranges:
        assert off % SECTOR == 0 and n % SECTOR == 0
        out.update((li, s) for s in range(off // SECTOR, (off + n) // SECTOR))
    return out


def expected_layer_sectors(image, reads):
    """Oracle: for each sector read, the topmost layer whose own index maps
    it (looked up per layer, not through the merged stack); zeroed -> none."""
    out = set()
    for off, n in reads:
        for s in range(off // SECTOR, -(-(off + n) // SECTOR)):
            for li in range(len(image.lowers) - 1, -1, -1):
                hit = image.lowers[li].index.lookup(s, 1)
                if hit:
                    _o, _l, moff, zeroed, _t = hit[0]
                    if not zeroed:
                        out.add((li, moff))
                    break
    return out


# ------------------------------------------------------------------ ext4 reader
def check_all_files(fs, src, files):
    for rel, data in files.items():
        assert fs.read_file("/" + rel) == data, rel
        ext = fs.file_extents("/" + rel)
        assert sum(n for _o, n in ext) >= len(data) - (len(data) if rel == "sparse.bin" else 0)
    walked = {p for p, _i in fs.walk("/")}
    assert {"/" + rel for rel in files} == walked


@pytest.mark.parametrize("opts", [
    ("-b", "1024"),
    ("-b", "4096", "-O", "^64bit"),
    ("-b", "2048", "-O", "^extent,^64bit,^flex_bg,^has_journal"),    # block maps (ext2 style)
    ("-b", "1024", "-O", "meta_bg,^resize_inode"),
    ("-b", "1024", "-I", "128", "-O", "^metadata_csum,^dir_index,^filetype"),
    ("-b", "4096", "-I", "512", "-O", "inline_data"),
], ids=["1k-64bit", "4k-32bit", "blockmap", "meta_bg", "128-inode-nofiletype", "inline_data"])
def test_ext4_reader_variants(tmp_path, opts):
    src = str(tmp_path / "src")
    files = make_tree(src)
    raw = str(tmp_path / "disk.raw")
    make_fs(raw, src, *opts, size=32 << 20)
    fragment(raw, files)
    fd = os.open(raw, os.O_RDONLY)
    try:
        def read(o, n):
            return os.pread(fd, n, o)
        fs = ext4.Ext4(read, 32 << 20, raw)
        check_all_files(fs, src, files)
        assert ext4.superblock(read)["block_size"] == fs.block_size
        assert fs.lookup("/fastlink") == fs.lookup("/small.txt")
        assert fs.lookup("/slowlink") == fs.lookup(f"/{LONG_DIR}/target.bin")
        assert fs.readlink(fs.lookup("/slowlink", follow=False)) == f"/{LONG_DIR}/target.bin".encode()
        assert fs.lookup("/a/clink/deep.txt") == fs.lookup("/a/b/c/deep.txt")
        assert fs.lookup("/a/clink/../../../small.txt") == fs.lookup("/small.txt")
        assert fs.lookup("/loop1") is None                       # ELOOP
        assert fs.lookup("/nope") is None and fs.lookup("/small.txt/x") is None
        with pytest.raises(FileNotFoundError):
            fs.file_extents("/nope")
    finally:
        os.close(fd)


@pytest.mark.parametrize("opts", [("-O", "meta_bg,^resize_inode"), ("-O", "meta_bg,^resize_inode,^64bit"),
                                  ("-O", "^meta_bg,^64bit")])
def test_group_descriptors_of_many_groups(tmp_path, opts):
    """Sparse 320 MiB disks with 1 KiB blocks: 40 groups, several descriptor
    blocks (meta_bg puts them in their meta groups); every group's inode
    table agrees with dumpe2fs, and an inode in the last group reads."""
    import re
    raw = str(tmp_path / "big.raw")
    with open(raw, "wb") as f:
        f.truncate(320 << 20)
    run("mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "80000", *opts, raw)
    fd = os.open(raw, os.O_RDONLY)
    try:
        fs = ext4.Ext4(lambda o, n: os.pread(fd, n, o), 320 << 20, raw)
        dump = subprocess.run(["dumpe2fs", raw], capture_output=True, text=True, check=True).stdout
        tables = [int(x) for x in re.findall(r"Inode table at (\d+)", dump)]
        assert len(tables) == fs.group_count >= 40
        assert [fs.inode_table(g) for g in range(fs.group_count)] == tables
        assert fs.inode(fs.inodes_count).mode == 0          # unused, but readable
        assert fs.lookup("/lost+found") == 11
    finally:
        os.close(fd)


def debugfs_leaf_extents(raw, path):
    """[(logical block, physical block, count)] from debugfs dump_extents -l."""
    import re
    out = subprocess.run(["debugfs", "-R", f"dump_extents -l {path}", raw], check=True,
                         capture_output=True, text=True).stdout
    got = []
    for m in re.finditer(r"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*(\S*)$",
                         out, re.M):
        lo, _hi, p, _pe, n, flags = m.groups()
        if "Uninit" not in flags:
            got.append((int(lo), int(p), int(n)))
    return got


def test_file_extents_match_debugfs(fsimg):
    raw = fsimg["raw"]
    fd = os.open(raw, os.O_RDONLY)
    try:
        fs = ext4.Ext4(lambda o, n: os.pread(fd, n, o), DISK, raw)
        big = fs.inode(fs.lookup("/a/b/big.bin"))
        depth = struct.unpack_from("<H", big.iblock, 6)[0]
        assert big.flags & ext4.INODE_FL_EXTENTS and depth >= 1
        for rel in ("a/b/big.bin", "small.txt", "a/mid.bin", "sparse.bin", "many/entry_with_a_long_name_0299",
                    "top/new.bin", f"{LONG_DIR}/target.bin"):
            bs = fs.block_size
            mine = [(f // bs, d // bs, n // bs) for f, d, n in fs.file_map(fs.lookup("/" + rel))]
            theirs = debugfs_leaf_extents(raw, "/" + rel)
            # debugfs lists the on-disk extents; file_map merges physically adjacent ones
            assert sorted(b for lb, pb, n in mine for b in zip(range(lb, lb + n), range(pb, pb + n))) == \
                sorted(b for lb, pb, n in theirs for b in zip(range(lb, lb + n), range(pb, pb + n))), rel
            assert theirs, rel
        assert len(fs.file_extents("/a/b/big.bin")) > 4
        many = fs.inode(fs.lookup("/many"))
        assert many.flags & 0x1000                                 # EXT4_INDEX_FL: an htree directory
        assert len(fs.listdir(many)) == 302
    finally:
        os.close(fd)


def test_ext4_through_layers(fsimg):
    cfgp = write_config(fsimg["tmp"], "plain", fsimg["layers"])
    with assemble.open_image(cfgp) as image:
        assert image.prefetch is None
        fs = open_fs(image)
        check_all_files(fs, fsimg["src"], fsimg["files"])
        # the extents read straight from the merged image are the files' bytes
        for rel in ("a/b/big.bin", "top/new.bin", "small.txt"):
            data = b"".join(image.read(off, n) for off, n in fs.file_extents("/" + rel))
            assert data[:len(fsimg["files"][rel])] == fsimg["files"][rel]


# ------------------------------------------------------------------ record
def do_reads(image, fs):
    """A mix of read, pread and read_into; returns the byte ranges asked for."""
    reads = []
    for rel in ("a/b/big.bin", "top/new.bin"):
        for off, n in fs.file_extents("/" + rel):
            image.read(off, n)
            reads.append((off, n))
    image.pread(1024 + 7, 100)
    reads.append((1024 + 7, 100))
    buf = bytearray(8192)
    off = fs.file_extents("/a/mid.bin")[0][0]
    image.read_into(buf, off)
    reads.append((off, 8192))
    image.read(DISK - 4096, 4096)                      # probably a hole
    reads.append((DISK - 4096, 4096))
    return reads


def test_record_trace_then_replay(fsimg, tmp_path):
    tracep = str(tmp_path / "trace")
    open(tracep, "wb").close()
    cfgp = write_config(str(tmp_path), "rec", fsimg["layers"], recordTracePath=tracep)
    image = assemble.open_image(cfgp)
    try:
        handle = image.prefetch
        assert isinstance(handle, prefetch.RecordHandle) and handle.mode == "record"
        assert os.path.exists(tracep + ".lock")
        assert isinstance(image.stack, prefetch.RecordingStack)  # on this image only
        reads = []

        def logged_read(o, n):                                   # the ext4 reader's reads, recorded too
            reads.append((o, n))
            return image.read(o, n)
        fs = ext4.Ext4(logged_read, image.virtual_size, "image")
        reads += do_reads(image, fs)
        want = expected_layer_sectors(image, reads)
        live = handle.records
    finally:
        image.close()
    assert not isinstance(image.stack, prefetch.RecordingStack)
    assert os.path.exists(tracep + ".ok") and not os.path.exists(tracep + ".lock")
    records = trace.read(tracep)
    assert records == live
    assert {r.layer_index for r in records} == {0, 1}
    got = sectors_of((r.layer_index, r.offset, r.count) for r in records)
    assert got == want

    # replay against a fresh open: the workers read exactly the recorded ranges
    cfg2 = write_config(str(tmp_path), "plain", fsimg["layers"])
    with assemble.open_image(cfg2) as image2:
        wrappers = count_backings(image2)
        h = prefetch.replay(image2, records, concurrency=3)
        assert h.wait(10)
        st = h.stats()
        assert st["done"] == len(records) and st["errors"] == 0 and st["skipped"] == 0
        touched = sectors_of((li, off, n) for li, w in enumerate(wrappers) for off, n in w.calls)
        assert touched == got
        assert all(n <= prefetch.PIECE for w in wrappers for _o, n in w.calls)
        assert st["bytes_read"] == sum(r.count for r in records)


def test_record_matches_oracle_exactly(fsimg, tmp_path):
    """Only known reads (no ext4 parsing during the recording): the trace's
    sectors are exactly the per-layer oracle's, and adjacent pieces merge."""
    cfg0 = write_config(str(tmp_path), "plain", fsimg["layers"])
    with assemble.open_image(cfg0) as image:
        fs = open_fs(image)
        plan = [e for rel in ("a/b/big.bin", "top/new.bin", "sparse.bin", "small.txt")
                for e in fs.file_extents("/" + rel)]
    tracep = str(tmp_path / "trace")
    open(tracep, "wb").close()
    cfgp = write_config(str(tmp_path), "rec", fsimg["layers"], recordTracePath=tracep)
    with assemble.open_image(cfgp) as image:
        ring_stack = image.stack                 # what the TCMU ring / FUSE hold and call read_into on
        for k, (off, n) in enumerate(plan):
            if k % 2:
                ring_stack.read_into(bytearray(n), off)
            else:
                image.read(off, n)
        image.read(0, 4096)
        image.read(DISK - 8192, 8192)
        want = expected_layer_sectors(image, plan + [(0, 4096), (DISK - 8192, 8192)])
        recs = image.prefetch.records
        # one read of a contiguous layer range is one record
        big = fs_extents_single(image, plan[0])
        assert big in [(r.layer_index, r.offset, r.count) for r in recs]
    assert sectors_of((r.layer_index, r.offset, r.count) for r in trace.read(tracep)) == want
    assert len(sectors_of((r.layer_index, r.offset, r.count) for r in recs)) == \
        sum(r.count for r in recs) // SECTOR                    # no sector recorded twice here


def fs_extents_single(image, rng):
    off, n = rng
    (li, boff, cnt), = prefetch.layer_reads(image, off, n)
    return li, boff, cnt


def test_layer_reads_unit(tmp_path):
    """Split index records of one contiguous run become one layer read (the
    core reads them with one pread); zeroed ranges and holes read nothing;
    layer_index counts from the bottom."""
    from tcmu_obd.image.stack import Image
    from tcmu_obd.image.layer import open_layer
    big = make_layer(str(tmp_path), "big", [(0, rnd(12 << 20, 9))], vsize=16 << 20)
    top = make_layer(str(tmp_path), "top", [(1 << 20, rnd(8192, 10)), (2 << 20, 8192, "discard")],
                     vsize=16 << 20)
    with Image([open_layer(big)]) as image:
        assert len(image.stack.lookup(0, (12 << 20) // SECTOR)) > 1
        (li, off, n), = prefetch.layer_reads(image, 0, 12 << 20)
        assert li == 0 and n == 12 << 20
        assert prefetch.layer_reads(image, 13 << 20, 4096) == []            # a hole
    with Image([open_layer(big), open_layer(top)]) as image:
        got = prefetch.layer_reads(image, (1 << 20) - 4096, 16384)
        assert [g[0] for g in got] == [0, 1, 0]
        assert [g[2] for g in got] == [4096, 8192, 4096]
        assert prefetch.layer_reads(image, 2 << 20, 8192) == []             # zeroed by the top layer
        assert prefetch.layer_reads(image, 0, 0) == []


def test_record_stops_when_lock_deleted(fsimg, tmp_path):
    tracep = str(tmp_path / "trace")
    open(tracep, "wb").close()
    cfgp = write_config(str(tmp_path), "rec", fsimg["layers"])
    image = assemble.open_image(cfgp)
    try:
        handle = prefetch.attach_recorder(image, tracep, poll_interval=0.05)
        image.read(0, 8192)
        n = len(handle.records)
        assert n >= 1
        os.unlink(tracep + ".lock")
        assert handle.wait(5)
        assert os.path.exists(tracep + ".ok")
        proxy = image.stack
        image.read(4096 * 100, 8192)                         # after the stop: not recorded, unwrapped
        assert not isinstance(image.stack, prefetch.RecordingStack)
        proxy.read_into(bytearray(4096), 0)                  # a frontend holding the proxy: still works
        assert len(trace.read(tracep)) == n
        handle.stop()
    finally:
        image.close()


def test_record_ignores_upper_layer(fsimg, tmp_path):
    tracep = str(tmp_path / "trace")
    open(tracep, "wb").close()
    data, index = str(tmp_path / "up.data"), str(tmp_path / "up.index")
    RWLayer.create(data, index, DISK).close()
    cfgp = write_config(str(tmp_path), "rw", fsimg["layers"], recordTracePath=tracep,
                        upper={"data": data, "index": index})
    with assemble.open_image(cfgp) as image:
        assert image.prefetch.mode == "record"
        image.write(b"\x55" * 8192, 0)
        image.read(0, 8192)
        assert image.prefetch.records == []                   # served by the upper layer
        image.read(8192, 4096)
        assert image.prefetch.records == [trace.TraceRecord("R", li, n, off)
                                          for li, off, n in prefetch.layer_reads(image, 8192, 4096)]


# ------------------------------------------------------------------ replay
def test_replay_from_config(fsimg, tmp_path):
    cfg0 = write_config(str(tmp_path), "plain", fsimg["layers"])
    with assemble.open_image(cfg0) as image:
        fs = open_fs(image)
        recs = [trace.TraceRecord("R", li, n, off)
                for rel in ("a/b/big.bin", "top/new.bin")
                for e in fs.file_extents("/" + rel)
                for li, off, n in prefetch.layer_reads(image, *e)]
        size0 = image.lowers[0].backing.size
    recs.append(trace.TraceRecord("R", 0, 3 << 20, 0))          # > 1 MiB: split into pieces
    bad = [trace.TraceRecord("R", 7, 4096, 0), trace.TraceRecord("W", 0, 4096, 0),
           trace.TraceRecord("R", 0, 4096, size0 + 4096)]
    tracep = str(tmp_path / "replay.trace")
    with open(tracep, "wb") as f:
        f.write(trace.encode(recs + bad))
    cfgp = write_config(str(tmp_path), "rep", fsimg["layers"], recordTracePath=tracep)
    with assemble.open_image(cfgp) as image:
        h = image.prefetch
        assert h.mode == "replay"
        assert h.wait(10)
        st = h.stats()
        assert st["done"] == len(recs) and st["skipped"] == 3 and st["errors"] == 0
        assert st["bytes_read"] == sum(min(r.count, size0 if r.layer_index == 0 else 1 << 62) for r in recs)
        assert st["pieces"] >= len(recs) + 2
    assert not os.path.exists(tracep + ".lock")


def test_replay_failures_are_ignored(fsimg, tmp_path):
    cfg0 = write_config(str(tmp_path), "plain", fsimg["layers"])
    with assemble.open_image(cfg0) as image:
        class Failing(CountingBacking):
            def pread(self, offset, length):
                super().pread(offset, length)
                raise OSError(5, "EIO")
        image.lowers[1].backing = Failing(image.lowers[1].backing)
        recs = [trace.TraceRecord("R", 1, 4096, 4096), trace.TraceRecord("R", 0, 4096, 4096)] * 3
        h = prefetch.replay(image, recs, concurrency=2)
        assert h.wait(10)
        st = h.stats()
        assert st["errors"] == 3 and st["done"] == 3
        assert len(image.lowers[1].backing.calls) == 3


def test_replay_stop_and_close(fsimg, tmp_path):
    cfg0 = write_config(str(tmp_path), "plain", fsimg["layers"])
    image = assemble.open_image(cfg0)
    gate = threading.Event()

    class Slow(CountingBacking):
        def pread(self, offset, length):
            gate.wait(5)
            return super().pread(offset, length)
    image.lowers[0].backing = Slow(image.lowers[0].backing)
    h = prefetch.replay(image, [trace.TraceRecord("R", 0, 4096, 4096 * i) for i in range(100)], 2)
    image.prefetch = h
    assert not h.wait(0.1)
    threading.Timer(0.2, gate.set).start()
    image.close()                                            # stops and joins the workers first
    assert h.finished and h.stats()["done"] < 100


def test_replay_bad_trace_or_no_workers(fsimg, tmp_path):
    tracep = str(tmp_path / "t")
    body = trace.encode([trace.TraceRecord("R", 0, 4096, 0)])
    with open(tracep, "wb") as f:
        f.write(body[:-1] + bytes([body[-1] ^ 1]))           # checksum mismatch: no replay
    cfgp = write_config(str(tmp_path), "bad", fsimg["layers"], recordTracePath=tracep)
    with assemble.open_image(cfgp) as image:
        assert image.prefetch is None
    assert open(str(tmp_path / "bad.result")).read() == "success"
    with open(tracep, "wb") as f:
        f.write(body)
    from tcmu_obd import service_config
    svc = service_config.from_dict({"prefetchConfig": {"concurrency": 0}})
    with assemble.open_image(cfgp, service_cfg=svc) as image:
        assert image.prefetch is None
    missing = write_config(str(tmp_path), "missing", fsimg["layers"], recordTracePath=str(tmp_path / "nope"))
    with assemble.open_image(missing) as image:
        assert image.prefetch is None


# ------------------------------------------------------------------ file list
LIST = ["/small.txt", "/a/b/", "/top/*", "/fastlink", "/does/not/exist", "not absolute",
        "/many/entry_with_a_long_name_0007", "/small.txt"]


def expected_list_ranges(fs):
    want = []
    for rel in ("small.txt", "a/b/big.bin", "a/b/c/deep.txt", "top/new.bin",
                "many/entry_with_a_long_name_0007"):
        for r in fs.file_extents("/" + rel):
            if r not in want:
                want.append(r)
    return want


def test_file_list_prefetch_reads_the_files(fsimg, tmp_path):
    cfg0 = write_config(str(tmp_path), "plain", fsimg["layers"])
    with assemble.open_image(cfg0) as image:
        fs = open_fs(image)
        want = expected_list_ranges(fs)
        entries = trace.parse_file_list("\n".join(LIST))
        ranges, errors = prefetch.file_list_ranges(fs, entries)
        assert errors == 0 and sorted(ranges) == sorted(want)

        reads = []
        lock = threading.Lock()
        orig = type(image).read

        def counting_read(offset, length):
            with lock:
                reads.append((offset, length))
            return orig(image, offset, length)
        image.read = counting_read
        h = prefetch.prefetch_files(image, entries, concurrency=4, name="list")
        assert h.wait(10)
        st = h.stats()
        assert st["errors"] == 0 and st["done"] == len(want)
        assert sorted(h.ranges) == sorted(want)
        covered = {(o + k) // SECTOR for o, n in reads for k in range(0, n, SECTOR)}
        assert all(s in covered for o, n in want for s in range(o // SECTOR, (o + n) // SECTOR))
        assert all(n <= prefetch.PIECE for _o, n in reads)


def test_file_list_from_config(fsimg, tmp_path):
    listp = str(tmp_path / "list")
    with open(listp, "w") as f:
        f.write("\n".join(LIST) + "\n")
    cfgp = write_config(str(tmp_path), "list", fsimg["layers"], recordTracePath=listp)
    with assemble.open_image(cfgp) as image:
        h = image.prefetch
        assert h.mode == "filelist"
        assert h.wait(10)
        want = expected_list_ranges(open_fs(image))
        assert sorted(h.ranges) == sorted(want)
        assert h.stats()["bytes_read"] == sum(n for _o, n in want)
    assert not os.path.exists(listp + ".lock")


def test_file_list_on_a_non_ext4_image(tmp_path):
    layer = make_layer(str(tmp_path), "junk", [(0, b"\x11" * 8192)], vsize=1 << 20)
    listp = str(tmp_path / "list")
    with open(listp, "w") as f:
        f.write("/etc/\n")
    cfgp = write_config(str(tmp_path), "junk", [layer], recordTracePath=listp)
    with assemble.open_image(cfgp) as image:
        h = image.prefetch
        assert h.wait(10) and h.stats()["errors"] == 1 and h.stats()["jobs"] == 0
    erofs = make_layer(str(tmp_path), "erofs", [(1024, struct.pack("<I", prefetch.EROFS_MAGIC) + bytes(508))],
                       vsize=1 << 20)
    cfgp = write_config(str(tmp_path), "erofs", [erofs], recordTracePath=listp)
    with assemble.open_image(cfgp) as image:
        h = image.prefetch
        assert h.wait(10) and h.stats()["errors"] == 1 and h.stats()["jobs"] == 0


def test_file_list_reads_the_lowers_under_an_upper(fsimg, tmp_path):
    """With a writable upper the list is resolved in, and read from, the
    merged read-only layers (the upper's writes do not count)."""
    listp = str(tmp_path / "list")
    with open(listp, "w") as f:
        f.write("/a/b/big.bin\n/top/\n")
    data, index = str(tmp_path / "up.data"), str(tmp_path / "up.index")
    RWLayer.create(data, index, DISK).close()
    cfgp = write_config(str(tmp_path), "rw", fsimg["layers"], recordTracePath=listp,
                        upper={"data": data, "index": index})
    with assemble.open_image(cfgp) as image:
        h = image.prefetch
        assert h.wait(10)
        fs = open_fs(image)
        want = fs.file_extents("/a/b/big.bin") + fs.file_extents("/top/new.bin")
        assert sorted(h.ranges) == sorted(want) and h.stats()["errors"] == 0
        image.write(bytes(4096), 0)                          # wipe the superblock in the upper
        read, size = prefetch.ro_reader(image)
        assert size == DISK and ext4.superblock(read) is not None
        assert ext4.superblock(image.read) is None
        h2 = prefetch.prefetch_files(image, trace.parse_file_list("/small.txt"), 2)
        assert h2.wait(10) and h2.ranges == fs.file_extents("/small.txt")


def test_file_list_stop_while_planning(fsimg, tmp_path):
    cfg0 = write_config(str(tmp_path), "plain", fsimg["layers"])
    with assemble.open_image(cfg0) as image:
        gate = threading.Event()
        reads = []
        orig = type(image).read

        def slow_read(offset, length):
            reads.append(offset)
            gate.wait(5)
            return orig(image, offset, length)
        image.read = slow_read
        h = prefetch.prefetch_files(image, trace.parse_file_list("/\n"), 4)
        threading.Timer(0.2, gate.set).start()
        h.stop()                                  # the planner gives up at its next read
        assert h.finished and h.stats()["jobs"] == 0 and len(reads) <= 2


# ------------------------------------------------------------------ acceleration layer
def test_acceleration_layer_trace(fsimg, tmp_path):
    accel = tmp_path / "accel"
    accel.mkdir()
    cfg0 = write_config(str(tmp_path), "plain", fsimg["layers"])
    with assemble.open_image(cfg0) as image:
        recs = [trace.TraceRecord("R", li, n, off) for li, off, n in prefetch.layer_reads(image, 0, 1 << 20)]
    assert {r.layer_index for r in recs} == {0, 1}
    (accel / "trace").write_bytes(trace.encode(recs))
    lowers = fsimg["layers"] + [{"dir": str(accel)}]           # the accel layer has no blob: never opened
    cfgp = write_config(str(tmp_path), "acc", lowers, accelerationLayer=True)
    with assemble.open_image(cfgp) as image:
        assert len(image.lowers) == 2
        h = image.prefetch
        assert h.mode == "replay" and h.wait(10)
        assert h.stats()["done"] == len(recs) and h.stats()["skipped"] == 0

    (accel / "trace").write_text("/small.txt\n/top/\n")         # a list works too
    with assemble.open_image(cfgp) as image:
        h = image.prefetch
        assert h.mode == "filelist" and h.wait(10)
        fs = open_fs(image)
        assert sorted(h.ranges) == sorted(fs.file_extents("/small.txt") + fs.file_extents("/top/new.bin"))

    (accel / "trace").write_bytes(b"")                         # empty: never recorded here
    with assemble.open_image(cfgp) as image:
        assert image.prefetch is None
    assert not (accel / "trace.lock").exists()
    (accel / "trace").unlink()
    with assemble.open_image(cfgp) as image:
        assert image.prefetch is None


# ------------------------------------------------------------------ bad ext4 bytes
class Disk:
    def __init__(self, raw):
        with open(raw, "rb") as f:
            self.b = bytearray(f.read())

    def read(self, o, n):
        return bytes(self.b[o:o + n])

    def fs(self):
        return ext4.Ext4(self.read, len(self.b), "disk")

    def put(self, off, fmt, *vals):
        struct.pack_into(fmt, self.b, off, *vals)


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    src = str(tmp / "src")
    files = make_tree(src)
    raw = str(tmp / "disk.raw")
    make_fs(raw, src, "-b", "1024", "-N", "512", size=4 << 20)
    fragment(raw, dict(files))
    raw2 = str(tmp / "blockmap.raw")
    make_fs(raw2, src, "-b", "1024", "-N", "512", "-O", "^extent,^64bit,^has_journal,^flex_bg", size=4 << 20)
    fragment(raw2, dict(files))
    return raw, raw2


def _fs_touch_all(fs):
    for path, ino in fs.walk("/"):
        fs.read_file(path)


SB = 1024


@pytest.mark.parametrize("field,off,fmt,val", [
    ("s_magic", SB + 0x38, "<H", 0x1234),
    ("s_log_block_size", SB + 0x18, "<I", 9),
    ("s_blocks_per_group", SB + 0x20, "<I", 0),
    ("s_inodes_per_group", SB + 0x28, "<I", 0),
    ("s_inode_size", SB + 0x58, "<H", 100),
    ("s_desc_size", SB + 0xFE, "<H", 17),
    ("s_blocks_count", SB + 0x04, "<I", 1 << 30),
    ("s_inodes_count", SB + 0x00, "<I", 0xFFFFFFFF),
    ("s_feature_incompat", SB + 0x60, "<I", 0x80000000 | 0x2C2),
    ("s_first_data_block", SB + 0x14, "<I", 1 << 24),
])
def test_bad_superblock(small_raw, field, off, fmt, val):
    d = Disk(small_raw[0])
    d.put(off, fmt, val)
    with pytest.raises(FormatError) as e:
        d.fs()
    assert field in str(e.value)


def test_bad_metadata(small_raw):
    d0 = Disk(small_raw[0])
    fs = d0.fs()
    root = fs.inode(2)
    big = fs.inode(fs.lookup("/a/b/big.bin"))
    assert len(fs.inode_extents(big)) > 4        # it parses fine before the damage
    idx_blk = struct.unpack_from("<I", big.iblock, 12 + 4)[0]
    bs = fs.block_size

    def self_loop(d):            # the leaf becomes an index node whose only child is itself
        d.put(big.disk_offset + 0x28 + 6, "<H", 2)
        d.put(idx_blk * bs + 2, "<H", 1)
        d.put(idx_blk * bs + 6, "<H", 1)
        d.put(idx_blk * bs + 12 + 4, "<IH", idx_blk, 0)
    cases = [
        ("eh_magic", lambda d: d.put(root.disk_offset + 0x28, "<H", 0xBEEF), "/"),
        ("eh_depth", lambda d: d.put(big.disk_offset + 0x28 + 6, "<H", 9), "/a/b/big.bin"),
        ("eh_entries", lambda d: d.put(big.disk_offset + 0x28 + 2, "<H", 5), "/a/b/big.bin"),
        ("used twice", self_loop, "/a/b/big.bin"),
        ("ee_start", lambda d: d.put(idx_blk * bs + 12 + 8, "<I", 1 << 30), "/a/b/big.bin"),
        ("ee_block", lambda d: d.put(idx_blk * bs + 24, "<I", 0), "/a/b/big.bin"),
        ("rec_len", lambda d: d.put(fs.inode_extents(root)[0][0] + 4, "<H", 3), "/"),
        ("name_len", lambda d: d.put(fs.inode_extents(root)[0][0] + 6, "<B", 200), "/"),
        ("bg_inode_table", lambda d: d.put(2 * bs + 8, "<I", 1 << 30), "/"),
    ]
    for why, damage, path in cases:
        d = Disk(small_raw[0])
        damage(d)
        with pytest.raises(FormatError) as e:
            f = d.fs()
            f.file_extents(path)
            _fs_touch_all(f)
        assert why in str(e.value), (why, str(e.value))


def test_bad_block_map(small_raw):
    d0 = Disk(small_raw[1])
    fs = d0.fs()
    big = fs.inode(fs.lookup("/a/b/big.bin"))
    ind = struct.unpack_from("<15I", big.iblock)
    assert ind[12] and ind[13]                     # single and double indirect in use
    for k, val, why in [(12, 1 << 30, "outside"), (0, 1 << 30, "outside")]:
        d = Disk(small_raw[1])
        d.put(big.disk_offset + 0x28 + 4 * k, "<I", val)
        with pytest.raises(FormatError) as e:
            d.fs().file_extents("/a/b/big.bin")
        assert why in str(e.value)
    # an indirect block that points at itself
    d = Disk(small_raw[1])
    d.put(big.disk_offset + 0x28 + 4 * 13, "<I", ind[12])
    d.put(ind[12] * fs.block_size, "<I", ind[12])
    with pytest.raises(FormatError) as e:
        d.fs().file_extents("/a/b/big.bin")
    assert "used twice" in str(e.value)


def test_directory_cycle_is_walked_once(small_raw):
    """A corrupt dir entry pointing at the root: the walk does not loop."""
    d = Disk(small_raw[0])
    fs = d.fs()
    a = fs.lookup("/a/b/c")
    blk = fs.inode_extents(a)[0][0]
    # turn c's "." entry (inode c) into a dir entry to the root under another name
    d.put(blk, "<I", 2)
    d.b[blk + 8] = ord("r")
    fs2 = d.fs()
    paths = [p for p, _i in fs2.walk("/")]
    assert len(paths) == len(set(paths))
    assert len(paths) < 1000


def test_inline_directory_with_xattr_part(tmp_path):
    """e2fsprogs never lets an inline directory grow into system.data (the
    kernel does), so make one by hand: an inline file whose data spills
    into the xattr becomes a directory with entries in both regions."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "spill").write_bytes(b"x" * 140)
    (src / "other").write_bytes(b"other")
    raw = str(tmp_path / "il.raw")
    make_fs(raw, str(src), "-b", "4096", "-I", "512", "-O", "inline_data", size=8 << 20)
    d = Disk(raw)
    fs = d.fs()
    node = fs.inode(fs.lookup("/spill"))
    other = fs.lookup("/other")
    value = fs._inline_value(node)
    assert node.inline and len(value) == 80
    voff = bytes(node.raw).index(value)
    d.put(node.disk_offset, "<H", 0o40755)
    d.put(node.disk_offset + 0x28, "<IIHBB1s", 2, other, 56, 1, 1, b"a")     # parent, then "a"
    d.put(node.disk_offset + voff, "<IHBB1s", other, 80, 1, 1, b"b")         # "b" in system.data
    fs2 = d.fs()
    names = [(n, i) for n, i, _t in fs2.listdir(node.ino)]
    assert names == [(b".", node.ino), (b"..", 2), (b"a", other), (b"b", other)]
    assert fs2.lookup("/spill/b") == other
    assert fs2.read_file("/spill/a") == b"other"
