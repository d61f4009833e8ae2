"""The file cache on its own: refill units, one fetch per unit however many
threads miss on it, presence rebuilt after a restart, eviction of a range and
of whole blobs by LRU, and a full disk (a real 3 MiB tmpfs) handled without
a dead loop.  The source is a real local file read with pread; a counter
around it only observes."""
import os
import subprocess
import threading

import pytest

from tcmu_obd.remote.cache import FileCache
from tcmu_obd.errors import ReadError
from conftest import FileSource

UNIT = 65536


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(3 * UNIT * 4 + 1234)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return FileSource(str(path)), data


def test_refill_units_and_exact_bytes(tmp_path, blob):
    src, data = blob
    cache = FileCache(str(tmp_path / "c"), 1, UNIT)
    cb = cache.open("sha256:" + "a" * 64, len(data), src)
    assert cb.read_at(100, 10) == data[100:110]
    assert src.reads == [(0, UNIT)]
    assert cb.read_at(UNIT - 5, 10) == data[UNIT - 5:UNIT + 5]      # one more unit
    assert src.reads[-1] == (UNIT, UNIT)
    assert cb.read_at(len(data) - 7, 100) == data[-7:]               # the short last unit
    assert src.reads[-1] == ((len(data) // UNIT) * UNIT, len(data) % UNIT)
    n = len(src.reads)
    assert cb.read_at(0, len(data)) == data
    assert [r for r in src.reads[n:]] == [(2 * UNIT, (len(data) // UNIT - 2) * UNIT)]   # one coalesced run
    cb.close()


def test_concurrent_misses_fetch_each_unit_once(tmp_path, blob):
    src, data = blob
    cache = FileCache(str(tmp_path / "c"), 1, UNIT)
    cb = cache.open("sha256:" + "b" * 64, len(data), src)
    barrier = threading.Barrier(8)
    out = []

    def reader(k):
        barrier.wait()
        out.append(cb.read_at(k * 1000, len(data) - k * 1000) == data[k * 1000:])

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out) and len(out) == 8
    fetched = sorted(src.reads)
    covered = []
    for off, n in fetched:
        covered.extend(range(off // UNIT, -(-(off + n) // UNIT)))
    assert sorted(covered) == list(range(-(-len(data) // UNIT)))      # every unit exactly once
    cb.close()


def test_presence_survives_restart(tmp_path, blob):
    src, data = blob
    cache = FileCache(str(tmp_path / "c"), 1, UNIT)
    cb = cache.open("sha256:" + "c" * 64, len(data), src)
    cb.read_at(0, 2 * UNIT)
    cb.read_at(len(data) - 1, 1)
    cb.close()
    src2 = FileSource(os.readlink(f"/proc/self/fd/{src.fd}"))
    cache2 = FileCache(str(tmp_path / "c"), 1, UNIT)
    assert cache2.used >= 2 * UNIT
    cb2 = cache2.open("sha256:" + "c" * 64, len(data), src2)
    assert cb2.read_at(0, 2 * UNIT) == data[:2 * UNIT]
    assert cb2.read_at(len(data) - 1, 1) == data[-1:]
    assert src2.reads == []
    cb2.close()


def test_evicted_range_is_refetched(tmp_path, blob):
    src, data = blob
    cache = FileCache(str(tmp_path / "c"), 1, UNIT)
    cb = cache.open("sha256:" + "d" * 64, len(data), src)
    cb.read_at(0, len(data))
    n = len(src.reads)
    cb.evict(UNIT + 10, 20)
    assert not cb.presence.has(UNIT, 1) and cb.presence.has(0, UNIT)
    assert os.pread(cb.fd, UNIT, UNIT) == bytes(UNIT)                 # punched
    assert cb.read_at(UNIT, UNIT) == data[UNIT:2 * UNIT]
    assert src.reads[n:] == [(UNIT, UNIT)]
    cb.close()


def test_lru_eviction_keeps_the_cache_under_its_size(tmp_path):
    blobs = []
    for k in range(6):
        path = tmp_path / f"b{k}"
        path.write_bytes(os.urandom(4 << 20))
        blobs.append(FileSource(str(path)))
    cache = FileCache(str(tmp_path / "c"), 10 / 1024, UNIT)            # 10 MiB
    names = [f"sha256:{k:064x}" for k in range(6)]
    for name, src in zip(names, blobs):
        cb = cache.open(name, src.size, src)
        cb.read_at(0, src.size)
        cb.close()
    assert cache.used <= cache.capacity
    on_disk = sum(os.stat(os.path.join(cache.dir, n)).st_blocks * 512 for n in os.listdir(cache.dir))
    assert on_disk <= cache.capacity
    assert not os.path.exists(os.path.join(cache.dir, names[0]))      # the oldest went first
    assert os.path.exists(os.path.join(cache.dir, names[-1]))


def _tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def test_full_disk_does_not_dead_loop(tmp_path):
    mnt = tmp_path / "small"
    if not _tmpfs(mnt, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = tmp_path / "big"
        data = os.urandom(8 << 20)
        path.write_bytes(data)
        src = FileSource(str(path))
        cache = FileCache(str(mnt), 1, UNIT)                          # claims 1 GiB on a 3 MiB disk
        cb = cache.open("sha256:" + "e" * 64, len(data), src)
        got_error = False
        for off in range(0, len(data), 1 << 20):
            try:
                assert cb.read_at(off, 1 << 20) == data[off:off + (1 << 20)]
            except ReadError as e:
                assert "cache disk full" in str(e)
                got_error = True
        assert got_error or cache.used <= 3 << 20
        cb.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
