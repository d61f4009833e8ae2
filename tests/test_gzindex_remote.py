"""GzipBacking over a remote gzip blob: the .gz is pushed to the real test
registry (tests/registry_server.py) and read through the project's
FileCache (a sparse cache file + presence bitmap) attached to a RawBacking.
Reads through the GzipBacking (alone and as file `tag` of a Stack) give the
uncompressed bytes; the misses come back in the blob's coordinates and
recover() fetches them through the target's fetcher; only the compressed
ranges the reads need are fetched.
"""
import gzip
import io
import os
import random

import pytest

from registry_server import Registry, require
from tcmu_obd.core import _lsmt as C
from tcmu_obd.errors import ReadError
from tcmu_obd.format import gzindex
from tcmu_obd.remote.cache import FileCache
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings

REPO = "gz/test"
UNIT = 65536


def _data():
    rng = random.Random(11)
    parts = []
    for _ in range(40):
        if rng.random() < 0.5:
            parts.append(rng.randbytes(rng.randrange(1, 300000)))
        else:
            parts.append(b"".join(rng.choice([b"tar ", b"entry\n", bytes(40)]) for _ in range(30000)))
    return b"".join(parts)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    require("docker-registry")
    tmp = tmp_path_factory.mktemp("gzremote")
    data = _data()
    gz = gzip.compress(data, 6, mtime=0)
    idx = gzindex.build_index(io.BytesIO(gz), tmp / "blob.gzidx", span=1 << 20)
    with Registry() as reg:
        digest = reg.push_blob(REPO, gz)
        yield {"reg": reg, "digest": digest, "gz": gz, "data": data, "idx": idx}


@pytest.mark.parametrize("M", [C])     # FileCache's presence bitmap is the C core's
def test_remote_gzip_reads_fetch_through_recover(M, pushed, tmp_path):
    client = RegistryClient(RegistrySettings())
    try:
        blob = client.open_blob(pushed["reg"].blob_url(REPO, pushed["digest"]))
        cache = FileCache(str(tmp_path / "cache"), 1, UNIT)
        cb = cache.open(pushed["digest"], len(pushed["gz"]), blob)
        raw = M.RawBacking(cb.fd, 0, len(pushed["gz"]), "remote.gz")
        raw.attach(cb.presence, cb)
        g = gzindex.open_backing(raw, pushed["idx"], "remote.gz[gzip]", impl=M)
        assert g.fetcher is cb
        data, idx = pushed["data"], pushed["idx"]
        # one read in the middle fetches only around its access point's span
        mid = idx.entries[len(idx.entries) // 2]
        assert g.pread(mid.de_pos + 1000, 4096) == data[mid.de_pos + 1000:mid.de_pos + 5096]
        present = cb.presence.count(0, len(pushed["gz"]))
        assert 0 < present < len(pushed["gz"]) // 2, present
        assert not cb.presence.has(0, 4096)                 # the blob's start was not needed
        # a stack whose records point into the stream (the warp layer's tag-1 path)
        lower = M.Index()
        lower.insert(0, 4000, 10, False, 0)
        lower.insert(8000, 8000, 6000, False, 0)
        stk = M.Stack([g], lower)
        want = bytearray(16000 * 512)
        want[:4000 * 512] = data[10 * 512:4010 * 512]
        want[8000 * 512:] = data[6000 * 512:14000 * 512]
        assert stk.read(0, 16000 * 512) == bytes(want)
        rng = random.Random(3)
        for _ in range(30):
            off = rng.randrange(len(data))
            n = rng.randrange(1, 200000)
            assert g.pread(off, n) == data[off:off + n]
        # without a fetcher a miss is an error naming the gzip backing, not zeros
        cache2 = FileCache(str(tmp_path / "cache2"), 1, UNIT)
        cb2 = cache2.open(pushed["digest"], len(pushed["gz"]), blob)
        raw2 = M.RawBacking(cb2.fd, 0, len(pushed["gz"]), "remote2.gz")
        raw2.attach(cb2.presence, None)
        g2 = gzindex.open_backing(raw2, pushed["idx"], "remote2.gz[gzip]", impl=M)
        with pytest.raises(ReadError) as e:
            g2.pread(0, 100)
        assert "remote2.gz[gzip]" in str(e.value) and "not in the cache" in str(e.value)
    finally:
        client.close()
        os.sync()
