"""Cold reads that overlap (tcmu_obd.remote.cache): read-ahead of a blob read
sequentially, concurrent fetches of one read's missing runs, the bound on
requests in flight per registry and on buffered bytes, cancellation of
read-ahead when the blob closes, and bytes always equal to the blob's.

The registry is the real test registry (docker-registry on 127.0.0.1)
behind the tests' FaultProxy, which counts the blob GETs it is answering
(`peak`) and can add a delay to each (a far registry); the model for the
property test is the blob's bytes themselves.  No assertion is timed.
"""
import os
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from registry_server import FaultProxy, Registry
from conftest import FileSource
from tcmu_obd.remote.cache import FileCache
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings

REPO = "obd/readahead"
UNIT = 65536
MiB = 1 << 20
BLOB = random.Random(12).randbytes(24 * MiB + 777)
NAME = "sha256:" + "e" * 64


@pytest.fixture(scope="module")
def registry():
    with Registry() as r:
        r.digest = r.push_blob(REPO, BLOB)
        yield r


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.url) as p:
        p.blob_url = registry.blob_url(REPO, registry.digest, base=p.url)
        yield p


@pytest.fixture
def client():
    c = RegistryClient(RegistrySettings(timeout=10, read_deadline=30))
    yield c
    c.close()


def _open(tmp_path, proxy, client, **kw):
    cache = FileCache(str(tmp_path / "cache"), 1, UNIT, **kw)
    remote = client.open_blob(proxy.blob_url)
    cb = cache.open(NAME, remote.size, remote)
    return cache, cb


def _data_gets(proxy, first=0):
    """(offset, length) of the data GETs the proxy saw since index `first`."""
    out = []
    for method, _path, rng, _fault in proxy.seen[first:]:
        if method == "GET" and rng and rng != "bytes=0-0":
            lo, hi = rng.split("=")[1].split("-")
            out.append((int(lo), int(hi) - int(lo) + 1))
    return out


def _settle(cb):
    """Wait until no unit of the blob is in flight (read-ahead queued or running)."""
    while True:
        with cb.lock:
            events = list(cb.inflight.values())
        if not events:
            return
        for ev in events:
            ev.wait()


def test_cache_readahead_fills_ahead_of_a_sequential_reader(tmp_path, proxy, client):
    cache, cb = _open(tmp_path, proxy, client, readahead=4 * MiB)
    try:
        first = len(proxy.seen)
        step = 128 << 10
        for off in range(0, 2 * MiB, step):                  # a sequential reader, 2 MiB
            assert cb.read_at(off, step) == BLOB[off:off + step]
        _settle(cb)
        # units after what was read are present: fetched ahead, not asked for
        assert cb.presence.has(2 * MiB, 2 * MiB), "nothing was read ahead"
        asked = sum(n for _o, n in _data_gets(proxy, first))
        assert asked >= 4 * MiB
        n_gets = len(_data_gets(proxy, first))
        for off in range(2 * MiB, 4 * MiB, step):            # served by what was read ahead
            assert cb.read_at(off, step) == BLOB[off:off + step]
        # the reader's misses kept the window moving, in large pieces (not one GET per unit)
        gets = _data_gets(proxy, first)
        assert len(gets) < (4 * MiB) // UNIT // 2, gets
        assert len(gets) >= n_gets
        assert cb.readahead_units > 0
    finally:
        cb.close()


def test_cache_readahead_large_window_in_several_large_requests(tmp_path, proxy, client):
    # a 16 MiB window is fetched as 4 MiB requests (a quarter of it), several in flight at once
    cache, cb = _open(tmp_path, proxy, client, readahead=16 * MiB)
    try:
        proxy.delay = 0.02
        proxy.peak = 0
        first = len(proxy.seen)
        step = 128 << 10
        for off in range(0, 12 * MiB, step):
            assert cb.read_at(off, step) == BLOB[off:off + step]
        _settle(cb)
        gets = _data_gets(proxy, first)
        assert max(n for _o, n in gets) == 4 * MiB, gets
        fetched = sum(n for _o, n in gets)
        assert len(gets) * 2 * MiB <= fetched, gets        # 2 MiB a request on average at least
        assert proxy.peak > 1, "read-ahead requests went one at a time"
        assert fetched <= 12 * MiB + 16 * MiB + UNIT
    finally:
        cb.close()


def test_cache_readahead_stray_miss_keeps_the_stream(tmp_path, proxy, client):
    # a miss elsewhere (another file's block, metadata) between a stream's reads neither
    # resets its window nor starts a new stream from one miss
    cache, cb = _open(tmp_path, proxy, client, readahead=4 * MiB)
    try:
        step = 128 << 10
        for off in range(0, 2 * MiB, step):
            assert cb.read_at(off, step) == BLOB[off:off + step]
        _settle(cb)
        window = cb._window
        assert window >= 2 * MiB
        far = 20 * MiB
        assert cb.read_at(far, 4096) == BLOB[far:far + 4096]     # the stray miss
        _settle(cb)
        assert not cb.presence.has(far + UNIT, UNIT), "one stray miss started read-ahead"
        assert cb._window == window
        for off in range(2 * MiB, 6 * MiB, step):                # the stream goes on, read ahead
            assert cb.read_at(off, step) == BLOB[off:off + step]
        _settle(cb)
        assert cb.presence.has(6 * MiB, 2 * MiB), "the stream lost its read-ahead"
    finally:
        cb.close()


def test_cache_readahead_out_of_order_stream(tmp_path, proxy, client):
    # the kernel has several reads of a sequential stream in flight: they reach the cache
    # shuffled within a few MiB; the stream is still followed and read ahead in large requests
    cache, cb = _open(tmp_path, proxy, client, readahead=8 * MiB)
    try:
        first = len(proxy.seen)
        rng = random.Random(3)
        group = 4 * MiB // UNIT
        for g in range(0, 16 * MiB // UNIT, group):
            units = list(range(g, g + group))
            rng.shuffle(units)
            for u in units:
                off = u * UNIT
                assert cb.read_at(off, UNIT) == BLOB[off:off + UNIT]
        _settle(cb)
        gets = _data_gets(proxy, first)
        assert cb.readahead_units >= 16 * MiB // UNIT // 2, (cb.readahead_units, gets)
        assert len(gets) * 4 * UNIT <= sum(n for _o, n in gets), gets
    finally:
        cb.close()


def test_cache_readahead_waiters_on_one_unit_start_nothing(tmp_path, proxy, client):
    # readers that all miss on the same unit (an open's header reads) are not a sequential stream
    cache, cb = _open(tmp_path, proxy, client, readahead=8 * MiB)
    try:
        proxy.delay = 0.05
        barrier = threading.Barrier(8)
        errors = []

        def reader(k):
            try:
                barrier.wait()
                off = 512 * k
                assert cb.read_at(off, 512) == BLOB[off:off + 512]
            except BaseException as e:
                errors.append(e)
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _settle(cb)
        assert not errors, errors[0]
        assert cb.readahead_units == 0
        assert not cb.presence.has(UNIT, 1)
    finally:
        cb.close()


def test_cache_readahead_random_reads_get_none(tmp_path, proxy, client):
    cache, cb = _open(tmp_path, proxy, client, readahead=4 * MiB)
    try:
        first = len(proxy.seen)
        rng = random.Random(5)
        for _ in range(20):
            off = rng.randrange(0, len(BLOB) // UNIT) * UNIT + 4096 * rng.randrange(1, 8)
            assert cb.read_at(off, 4096) == BLOB[off:off + 4096]
        _settle(cb)
        assert sum(n for _o, n in _data_gets(proxy, first)) <= 20 * UNIT + UNIT
    finally:
        cb.close()


def test_cache_readahead_one_reads_runs_fetched_concurrently(tmp_path, proxy, client):
    cache, cb = _open(tmp_path, proxy, client, max_requests=4)
    try:
        for u in range(0, 16, 2):                            # every other unit present
            cb.read_at(u * UNIT, 1)
        proxy.delay = 0.05
        proxy.peak = 0
        first = len(proxy.seen)
        assert cb.read_at(0, 16 * UNIT) == BLOB[:16 * UNIT]    # one read, eight missing runs
        assert len(_data_gets(proxy, first)) == 8
        assert proxy.peak > 1, "the runs of one read were fetched one after another"
        assert proxy.peak <= 4
    finally:
        cb.close()


@pytest.mark.parametrize("bound", [1, 3])
def test_cache_readahead_requests_per_registry_bounded(tmp_path, proxy, client, bound):
    cache, cb = _open(tmp_path, proxy, client, readahead=4 * MiB, max_requests=bound,
                      max_buffer=2 * MiB)
    proxy.delay = 0.02
    proxy.peak = 0
    errors = []

    def sequential(base):
        try:
            for off in range(base, base + 3 * MiB, 256 << 10):
                assert cb.read_at(off, 256 << 10) == BLOB[off:off + (256 << 10)]
        except BaseException as e:
            errors.append(e)

    def scattered(seed):
        rng = random.Random(seed)
        try:
            for _ in range(6):
                off = rng.randrange(0, len(BLOB) - MiB)
                n = rng.choice([4096, 300 << 10, MiB])
                assert cb.read_at(off, n) == BLOB[off:off + n]
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=sequential, args=(k * 8 * MiB,)) for k in range(2)]
    threads += [threading.Thread(target=scattered, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _settle(cb)
    cb.close()
    assert not errors, errors[0]
    assert 1 <= proxy.peak <= bound, proxy.peak
    assert cache.slots_for(cb.source).peak <= bound
    assert cache.buffer.peak <= 2 * MiB
    if bound > 1:
        assert proxy.peak > 1, "the reads never overlapped"


def test_cache_readahead_close_cancels(tmp_path, proxy, client):
    # one slot for read-ahead, a slow registry: most of the window is still queued at close
    cache, cb = _open(tmp_path, proxy, client, readahead=8 * MiB, max_requests=2)
    proxy.delay = 0.05
    for off in range(0, 6 * UNIT, UNIT):
        assert cb.read_at(off, UNIT) == BLOB[off:off + UNIT]
    with cb.lock:
        pending = sorted(cb.inflight)
    assert len(pending) >= 3 * MiB // UNIT, "too little read-ahead was queued"
    cb.close()
    at_close = len(proxy.seen)
    assert proxy.in_flight == 0                              # close waited for the running one
    _settle(cb)                                              # the queued ones ran and gave up
    assert len(proxy.seen) == at_close, proxy.seen[at_close:]
    dropped = [u for u in pending if not cb.presence.has(u * UNIT, 1)]
    assert dropped, "close let every queued read-ahead run"
    # the presence file claims only what was stored: reopen and read everything
    cb2 = cache.open(NAME, len(BLOB), client.open_blob(proxy.blob_url))
    proxy.delay = 0
    try:
        assert cb2.read_at(0, len(BLOB)) == BLOB
    finally:
        cb2.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40 * 4096), st.integers(1, 6 * 4096),
                          st.integers(1, 8)), min_size=1, max_size=12),
       st.sampled_from([0, 8192, 65536]), st.integers(1, 4), st.sampled_from([0.1, 4.0]))
def test_cache_readahead_bytes_match_the_model(tmp_path_factory, reads, readahead, max_requests, size_mb):
    """Threads read runs (sequential streams of `count` reads) of a blob
    through a cache with read-ahead, small bounds and, with 0.1 MB, evictions
    while reading: every read returns the blob's bytes."""
    tmp = tmp_path_factory.mktemp("model")
    data = random.Random(len(reads)).randbytes(48 * 4096 + 123)
    (tmp / "blob").write_bytes(data)
    src = FileSource(tmp / "blob")
    cache = FileCache(str(tmp / "c"), size_mb / 1024, 4096, readahead=readahead,
                      max_requests=max_requests, max_buffer=3 * 4096)
    cb = cache.open(NAME, len(data), src)
    errors = []

    def run(items):
        try:
            for _thread, off, n, count in items:
                for k in range(count):
                    o = off + k * n
                    assert cb.read_at(o, n) == data[o:o + n], (o, n)
        except BaseException as e:
            errors.append(e)
    by_thread = {}
    for item in reads:
        by_thread.setdefault(item[0], []).append(item)
    threads = [threading.Thread(target=run, args=(items,)) for items in by_thread.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _settle(cb)
    cb.close()
    src.close()
    assert not errors, errors[0]
    assert cache.buffer.peak <= 3 * 4096
    assert cache.slots_for(src).peak <= max_requests


@pytest.mark.parametrize("kw,shown", [({"readahead": -1}, "readahead = -1"),
                                      ({"max_requests": 0}, "max_requests = 0"),
                                      ({"max_buffer": 0}, "max_buffer = 0"),
                                      ({"max_requests": 2.5}, "max_requests = 2.5")])
def test_cache_readahead_bad_settings_refused(tmp_path, kw, shown):
    with pytest.raises(ValueError, match=f"FileCache {shown}: must be an integer"):
        FileCache(str(tmp_path / "c"), 1, UNIT, **kw)
