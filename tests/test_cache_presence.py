"""What a cached blob claims to hold: presence comes from the presence file
beside the blob file, never from the file's allocation, so a file system
that reports no holes (a real ramfs) serves fetched bytes, not zeros; a
restart keeps what was fetched and never claims what was not; a presence
file that is bad or belongs to another file is ignored (the blob starts
empty); and at every step the presence file on disk (what a crash would
leave) claims only bytes equal to the blob's.  Sources are real files read
with pread; the remote layer is a real committed layer."""
import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import FileSource, make_layer, mount_fs, umount
from tcmu_obd.remote import cache as cache_mod
from tcmu_obd.remote.cache import SIDECAR, FileCache, file_id, load_presence
from tcmu_obd.errors import FormatError, ReadError, UsageError
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_cached_layer, open_layer

UNIT = 65536


@pytest.fixture(params=["ramfs", "tmpfs"])
def fsdir(request, tmp_path):
    mnt = mount_fs(tmp_path / request.param, request.param)
    yield request.param, str(mnt)
    umount(mnt)


@pytest.fixture
def raw_layer(tmp_path):
    rng = random.Random(5)
    writes = [(k * 192 * 1024, rng.randbytes(64 * 1024)) for k in range(20)]
    return make_layer(str(tmp_path), "raw", writes, vsize=8 << 20)


def test_hole_reporting_is_detected(fsdir):
    fstype, d = fsdir
    assert cache_mod.reports_holes(d) == (fstype == "tmpfs")
    assert os.listdir(d) == []                  # the probe leaves nothing behind


def test_uncompressed_remote_layer_reads_its_bytes(fsdir, raw_layer):
    # on ramfs every byte of the sparse cache file looks allocated: presence
    # inferred from allocation read zeros ("not an LSMT file")
    _fstype, d = fsdir
    src = FileSource(raw_layer)
    cache = FileCache(d, 1, UNIT)
    blob = cache.open("sha256:" + "1" * 64, src.size, src)
    with Image([open_cached_layer(blob, "remote-raw")]) as remote, Image([open_layer(raw_layer)]) as local:
        assert remote.read(0, 8 << 20) == local.read(0, 8 << 20)
    assert src.reads, "nothing was fetched"


def test_restart_keeps_fetched_never_claims_unfetched(fsdir, tmp_path):
    _fstype, d = fsdir
    data = random.Random(1).randbytes(40 * UNIT + 999)
    (tmp_path / "blob").write_bytes(data)
    name = "sha256:" + "2" * 64
    src = FileSource(tmp_path / "blob")
    cb = FileCache(d, 1, UNIT).open(name, len(data), src)
    fetched = [(3 * UNIT + 5, 2 * UNIT), (len(data) - 10, 10), (20 * UNIT, 1)]
    for off, n in fetched:
        assert cb.read_at(off, n) == data[off:off + n]
    cb.close()
    assert sorted(os.listdir(d)) == [name, name + SIDECAR]

    src2 = FileSource(tmp_path / "blob")
    cache2 = FileCache(d, 1, UNIT)
    assert list(cache2.lru) == [name]                   # the presence file is no blob
    cb2 = cache2.open(name, len(data), src2)
    claimed = {u for u in range(41) if cb2.presence.has(u * UNIT, 1)}
    assert claimed == {3, 4, 5, 20, 40}
    for off, n in fetched:
        assert cb2.read_at(off, n) == data[off:off + n]
    assert src2.reads == []
    assert cb2.read_at(0, len(data)) == data              # the rest is fetched, not zeros
    # the missing runs, each unit once (long runs come as concurrent pieces)
    got = sorted(u for off, n in src2.reads for u in range(off // UNIT, -(-(off + n) // UNIT)))
    assert got == [*range(0, 3), *range(6, 20), *range(21, 40)]
    cb2.close()


def _fill_and_close(d, name, data, src, ranges):
    cb = FileCache(d, 1, UNIT).open(name, len(data), src)
    for off, n in ranges:
        cb.read_at(off, n)
    cb.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "size", "foreign", "stale_file"])
def test_bad_presence_file_starts_empty(tmp_path, damage):
    data = random.Random(2).randbytes(8 * UNIT)
    (tmp_path / "blob").write_bytes(data)
    d = str(tmp_path / "c")
    name, other = "sha256:" + "3" * 64, "sha256:" + "4" * 64
    src = FileSource(tmp_path / "blob")
    _fill_and_close(d, name, data, src, [(0, len(data))])
    side = os.path.join(d, name + SIDECAR)
    raw = bytearray(open(side, "rb").read())
    if damage == "flip":
        raw[-6] ^= 0x40
    elif damage == "truncate":
        raw = raw[:-1]
    elif damage == "magic":
        raw[0:8] = b"NOTPRES1"
    elif damage == "size":
        raw[8] ^= 1
    if damage == "foreign":
        # another blob's file of the same size, with this one's presence file
        shutil.copy(side, os.path.join(d, other + SIDECAR))
        with open(os.path.join(d, other), "wb") as f:
            f.truncate(len(data))
        name = other
    elif damage == "stale_file":
        # the blob file was replaced (same name, new inode) behind the cache's back
        os.unlink(os.path.join(d, name))
        with open(os.path.join(d, name), "wb") as f:
            f.write(bytes(len(data)))
    else:
        open(side, "wb").write(raw)
    fd = os.open(os.path.join(d, name), os.O_RDONLY)
    st_, ident = os.fstat(fd), file_id(fd)
    os.close(fd)
    with pytest.raises(FormatError) as e:
        load_presence(os.path.join(d, name + SIDECAR), len(data), UNIT, st_, ident)
    assert os.path.join(d, name + SIDECAR) in str(e.value)
    src2 = FileSource(tmp_path / "blob")
    cb = FileCache(d, 1, UNIT).open(name, len(data), src2)
    assert cb.presence.missing(0, len(data)) == [(0, len(data))]
    assert cb.read_at(0, len(data)) == data
    cb.close()


def test_presence_file_of_missing_blob_is_removed(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / ("sha256:" + "5" * 64 + SIDECAR)).write_bytes(b"x" * 10)
    (d / ("sha256:" + "6" * 64 + SIDECAR + ".tmp")).write_bytes(b"x")
    cache = FileCache(str(d), 1, UNIT)
    assert cache.lru == {} and os.listdir(d) == []


def test_evicting_a_closed_blob_removes_its_presence_file(tmp_path):
    data = os.urandom(4 * UNIT)
    (tmp_path / "blob").write_bytes(data)
    d = str(tmp_path / "c")
    name = "sha256:" + "7" * 64
    _fill_and_close(d, name, data, FileSource(tmp_path / "blob"), [(0, len(data))])
    cache = FileCache(d, 1, UNIT)
    cache._evict_blob(name)
    assert os.listdir(d) == [] and cache.used == 0


class Crash:
    """After each step, what a crash would leave: the presence file on disk
    must claim only units whose bytes in the blob file equal the blob's."""

    @staticmethod
    def check(d, name, data):
        path = os.path.join(d, name)
        fd = os.open(path, os.O_RDONLY)
        st_, ident = os.fstat(fd), file_id(fd)
        os.close(fd)
        try:
            bits = load_presence(path + SIDECAR, len(data), UNIT, st_, ident)
        except FileNotFoundError:
            return set()
        on_disk = open(path, "rb").read()
        claimed = set()
        for u in range(-(-len(data) // UNIT)):
            if bits[u >> 3] >> (u & 7) & 1:
                claimed.add(u)
                assert on_disk[u * UNIT:(u + 1) * UNIT] == data[u * UNIT:(u + 1) * UNIT], u
        return claimed


OPS = st.lists(st.tuples(st.sampled_from(["read", "evict", "persist", "reopen"]),
                         st.integers(0, 12 * UNIT), st.integers(1, 4 * UNIT)), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_presence_file_never_claims_absent_bytes(tmp_path_factory, ops):
    tmp = tmp_path_factory.mktemp("crash")
    data = random.Random(len(ops)).randbytes(12 * UNIT + 77)
    (tmp / "blob").write_bytes(data)
    d, name = str(tmp / "c"), "sha256:" + "8" * 64
    src = FileSource(tmp / "blob")
    cache = FileCache(d, 1, UNIT)
    cb = cache.open(name, len(data), src)
    units = range(-(-len(data) // UNIT))
    for op, off, n in ops:
        if op == "read":
            assert cb.read_at(off, n) == data[off:off + n]
        elif op == "evict":
            cb.evict(off, n)
        elif op == "persist":
            cb.persist()
        else:
            cb.close()
            claimed = Crash.check(d, name, data)
            cache = FileCache(d, 1, UNIT)
            cb = cache.open(name, len(data), src)
            assert {u for u in units if cb.presence.has(u * UNIT, 1)} == claimed     # all it recorded
        Crash.check(d, name, data)
    cb.close()
    Crash.check(d, name, data)
    src.close()


def test_reopen_with_another_size_is_refused_while_open(tmp_path):
    data = os.urandom(4 * UNIT)
    (tmp_path / "blob").write_bytes(data)
    name = "sha256:" + "9" * 64
    cache = FileCache(str(tmp_path / "c"), 1, UNIT)
    cb = cache.open(name, len(data), FileSource(tmp_path / "blob"))
    assert cb.read_at(0, len(data)) == data
    with pytest.raises(ReadError) as e:
        cache.open(name, len(data) + 512, FileSource(tmp_path / "blob"))
    assert name in str(e.value) and str(len(data)) in str(e.value) and str(len(data) + 512) in str(e.value)
    assert os.path.getsize(cb.path) == len(data)            # not truncated under its reader
    assert cb.read_at(0, len(data)) == data and cb.presence.has(0, len(data))
    cb.close()
    # closed: a stale file of the wrong size is reset for the new size
    data2 = os.urandom(5 * UNIT)
    (tmp_path / "blob2").write_bytes(data2)
    src2 = FileSource(tmp_path / "blob2")
    cb2 = cache.open(name, len(data2), src2)
    assert cb2.presence.missing(0, len(data2)) == [(0, len(data2))]
    assert cb2.read_at(0, len(data2)) == data2
    cb2.close()


PRESENCE_OPS = st.lists(st.tuples(st.sampled_from(["set", "clear", "evict", "reload"]),
                                  st.integers(0, 40 * 4096), st.integers(0, 12 * 4096)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 40 * 4096), ops=PRESENCE_OPS)
def test_presence_twin_agrees_with_a_set_model(size, ops):
    """The core's Presence and tcmu_obd.core.reference's against a set of units."""
    from tcmu_obd.core import _lsmt as C, reference as R
    unit = 4096
    nunits = -(-size // unit)
    ps = [C.Presence(size, unit), R.Presence(size, unit)]
    model = set()
    for op, off, n in ops:
        end = min(off + n, size)
        touched = set(range(off // unit, -(-end // unit))) if n and off < size else set()
        if op == "set":
            whole = {u for u in touched if u * unit >= off and (min((u + 1) * unit, size) <= end)}
            model |= whole
            for p in ps:
                p.set(off, n)
        elif op == "clear":
            model -= touched
            for p in ps:
                p.clear(off, n)
        elif op == "evict":
            freed = sum(min((u + 1) * unit, size) - u * unit for u in touched & model)
            model -= touched
            assert [p.evict(-1, off, n) for p in ps] == [(freed, 0)] * 2
        else:
            bits = ps[0].bitmap()
            assert ps[1].bitmap() == bits
            ps = [C.Presence(size, unit), R.Presence(size, unit)]
            for p in ps:
                p.set_bitmap(bits)
        for p in ps:
            assert {u for u in range(nunits) if p.has(u * unit, 1)} == model
            assert p.count(0, size) == sum(min((u + 1) * unit, size) - u * unit for u in model)
            assert p.count(off, n) == sum(min((u + 1) * unit, size) - u * unit for u in touched & model)
    for p in ps:
        with pytest.raises(UsageError) as e:
            p.set_bitmap(b"\0" * ((nunits + 7) // 8 + 1))
        assert "bitmap of" in str(e.value)
