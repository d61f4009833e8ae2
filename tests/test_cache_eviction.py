"""Eviction against readers and eviction order: reads racing eviction in
real threads (through the core's pread and mapped ZFile paths and through
CachedBlob.read_at) never see a punched hole as data, and the blob evicted
is the least recently *used* one, counting reads the core serves from the
cache without calling Python.  Sources are real files read with pread."""
import os
import random
import threading

from conftest import FileSource, make_layer
from tcmu_obd import core
from tcmu_obd.remote.cache import FileCache
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_cached_layer, open_layer

UNIT = 65536
MiB = 1 << 20


def _blob_file(tmp_path, name, size, seed):
    data = random.Random(seed).randbytes(size)
    (tmp_path / name).write_bytes(data)
    return data, FileSource(tmp_path / name)


def _run(threads):
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a reader hung"


def test_reads_racing_eviction_never_see_holes(tmp_path):
    data, src = _blob_file(tmp_path, "raw", 2 * MiB, 1)
    cache = FileCache(str(tmp_path / "c"), 1, UNIT)
    cb = cache.open("sha256:" + "a" * 64, len(data), src)
    raw = core.RawBacking(cb.fd, 0, len(data), "raw")
    raw.attach(cb.presence, cb)
    stop = threading.Event()
    bad, reads = [], [0]

    def reader(seed, via_core):
        rng = random.Random(seed)
        while not stop.is_set():
            off = rng.randrange(0, len(data) - 4096)
            n = rng.randrange(1, min(256 << 10, len(data) - off))
            got = raw.pread(off, n) if via_core else cb.read_at(off, n)
            reads[0] += 1
            if got != data[off:off + n]:
                bad.append((off, n))

    def evictor():
        rng = random.Random(9)
        for k in range(3000):
            if k % 50 == 0:
                cb.evict(0, len(data))                  # the whole blob, as LRU eviction does
            else:
                cb.evict(rng.randrange(len(data)), rng.randrange(1, 4 * UNIT))
        stop.set()

    _run([threading.Thread(target=reader, args=(k, k % 2 == 0)) for k in range(4)]
         + [threading.Thread(target=evictor)])
    assert bad == [] and reads[0] > 100


def test_mapped_zfile_reads_racing_eviction(tmp_path):
    rng = random.Random(3)
    writes = [(k * 256 * 1024, bytes(rng.getrandbits(8) & 0x1F for _ in range(96 * 1024))) for k in range(24)]
    path = make_layer(str(tmp_path), "z", writes, vsize=8 * MiB, use_zfile=True)
    src = FileSource(path)
    cache = FileCache(str(tmp_path / "c"), 1, UNIT)
    cb = cache.open("sha256:" + "b" * 64, src.size, src)
    layer = open_cached_layer(cb, "z")
    assert layer.backing.mapped
    with Image([layer]) as remote, Image([open_layer(path)]) as local:
        want = local.read(0, 8 * MiB)
        stop = threading.Event()
        bad = []

        def reader(seed):
            r = random.Random(seed)
            while not stop.is_set():
                off = r.randrange(0, 8 * MiB // 512 - 8) * 512
                n = r.randrange(1, min(512, 8 * MiB // 512 - off // 512)) * 512
                if remote.read(off, n) != want[off:off + n]:
                    bad.append((off, n))

        def evictor():
            r = random.Random(4)
            for _ in range(1500):
                cb.evict(r.randrange(src.size), r.randrange(1, 3 * UNIT))
            stop.set()

        _run([threading.Thread(target=reader, args=(k,)) for k in range(4)] + [threading.Thread(target=evictor)])
        assert bad == []


def test_tiny_cache_eviction_by_fills_with_readers(tmp_path):
    # two 3 MiB blobs in a 4 MiB cache: every fill of one evicts the other
    blobs = [_blob_file(tmp_path, f"b{k}", 3 * MiB, 10 + k) for k in range(2)]
    cache = FileCache(str(tmp_path / "c"), 4 / 1024, UNIT)
    cbs = [cache.open(f"sha256:{k:064x}", len(d), s) for k, (d, s) in enumerate(blobs)]
    backings = []
    for cb in cbs:
        b = core.RawBacking(cb.fd, 0, cb.size, cb.name)
        b.attach(cb.presence, cb)
        backings.append(b)
    bad = []

    def reader(seed):
        rng = random.Random(seed)
        for _ in range(300):
            k = rng.randrange(2)
            data = blobs[k][0]
            off = rng.randrange(len(data) - 1)
            n = rng.randrange(1, min(512 << 10, len(data) - off))
            if backings[k].pread(off, n) != data[off:off + n]:
                bad.append((k, off, n))

    _run([threading.Thread(target=reader, args=(s,)) for s in range(4)])
    assert bad == []
    assert cache.evictions > 0
    assert cache.used <= cache.capacity + 2 * MiB      # at most the reads in flight over
    for cb in cbs:
        cb.close()


def test_eviction_order_is_least_recently_used(tmp_path):
    blobs = [_blob_file(tmp_path, n, MiB, k) for k, n in enumerate("ABC")]
    # 2.5 MiB: water 2.25 MiB, risk 2.375 MiB: the third blob evicts exactly one
    cache = FileCache(str(tmp_path / "c"), 2.5 / 1024, UNIT)
    cbs = {}
    for name, (data, src) in zip("AB", blobs):
        cbs[name] = cache.open(f"sha256:{ord(name):064x}", len(data), src)
        assert cbs[name].read_at(0, len(data)) == data
    # A is used after B was filled, by the core alone: no Python ensure/read_at runs
    a = core.RawBacking(cbs["A"].fd, 0, MiB, "A")
    a.attach(cbs["A"].presence, cbs["A"])
    n_reads = len(blobs[0][1].reads)
    for off in range(0, MiB, 4096):
        assert a.pread(off, 4096) == blobs[0][0][off:off + 4096]
    assert len(blobs[0][1].reads) == n_reads            # served from the cache
    c = cache.open(f"sha256:{ord('C'):064x}", MiB, blobs[2][1])
    assert c.read_at(0, MiB) == blobs[2][0]
    assert cbs["A"].presence.has(0, MiB), "A was read last but evicted"
    assert cbs["B"].presence.count(0, MiB) == 0
    assert cache.evictions == 1
    assert cache.used <= cache.water


def test_closed_blobs_keep_their_use_order(tmp_path):
    blobs = [_blob_file(tmp_path, n, MiB, k) for k, n in enumerate("ABC")]
    cache = FileCache(str(tmp_path / "c"), 2.5 / 1024, UNIT)
    names = [f"sha256:{ord(n):064x}" for n in "ABC"]
    opened = [cache.open(names[k], MiB, blobs[k][1]) for k in range(2)]
    for cb in opened:
        cb.read_at(0, MiB)
    opened[0].read_at(5000, 100)                        # A used last
    for cb in opened:
        cb.close()
    c = cache.open(names[2], MiB, blobs[2][1])
    c.read_at(0, MiB)
    assert os.path.exists(os.path.join(cache.dir, names[0]))
    assert not os.path.exists(os.path.join(cache.dir, names[1]))
    c.close()
