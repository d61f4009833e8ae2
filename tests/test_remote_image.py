"""Lazy remote images against a real registry on loopback: an image pushed
by the project's own upload code (the bundled base layer plus layers made by
the tools) opens fetching only headers and indexes, reads the same bytes as
the same stack from local files, keeps its cache across a restart, heals a
corrupted block, and fails within its deadline when the registry is gone."""
import json
import os
import random
import time

import pytest

from conftest import commit_layer
from registry_server import FaultProxy, Registry, require
from tcmu_obd.image import assemble, baselayer
from tcmu_obd import service_config
from tcmu_obd.errors import ConfigError, ObdError, RemoteError
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.remote.distribution import BlobUploader
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings, blob_url
from tcmu_obd.image.rw import RWLayer

require("docker-registry")
REPO = "obd/remote-test"
rng = random.Random(77)


def _upload(client, base_url, path):
    up = BlobUploader(client, f"{base_url}/v2/{REPO}/blobs/uploads/", chunk_size=1 << 20)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(3 << 20)
            if not chunk:
                break
            up.write(chunk)
    return up.close(), os.path.getsize(path)


def _layer(tmp, name, writes, **kw):
    up = RWLayer.create(os.path.join(tmp, name + ".d"), os.path.join(tmp, name + ".i"), 64 << 30)
    for off, data in writes:
        if data is None:
            up.discard(off, 1 << 20)
        else:
            up.write(data, off)
    path = commit_layer(up, os.path.join(tmp, name), **kw)
    up.close()
    return path


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("remote"))
    with Registry() as reg:
        # semi-compressible data so ZFile blocks are real compressed blocks
        def data(n):
            return bytes(rng.getrandbits(8) & 0x3F for _ in range(n))
        l1 = _layer(tmp, "l1", [(1 << 30, data(3 << 20)), (5 << 30, data(1 << 20))],
                    use_zfile=True, use_tar=True)
        l2 = _layer(tmp, "l2", [((1 << 30) + (1 << 20), os.urandom(1 << 20)), (5 << 30, None),
                                (200 << 20, os.urandom(2 << 20))])
        files = [baselayer.path(), l1, l2]
        client = RegistryClient(RegistrySettings())
        lowers = []
        for path in files:
            digest, size = _upload(client, reg.url, path)
            lowers.append({"digest": digest, "size": size})
        client.close()
        yield {"reg": reg, "tmp": tmp, "files": files, "lowers": lowers}


def _configs(pushed, tmp_path, url=None, deadline=30, cache="cache", readahead=8 << 20):
    svc = tmp_path / "overlaybd.json"
    svc.write_text(json.dumps({
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / cache), "cacheSizeGB": 1,
                        "refillSize": 262144},
        "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")},
        "tcmuObd": {"registryTimeoutSec": 2, "registryRetries": 2, "readDeadlineSec": deadline,
                    "readAheadBytes": readahead},
    }))
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps({"repoBlobUrl": f"{url or pushed['reg'].url}/v2/{REPO}/blobs",
                               "lowers": pushed["lowers"], "resultFile": str(tmp_path / "result")}))
    return cfg, service_config.load(str(svc))


def _cached_bytes(cache_dir):
    return sum(os.stat(os.path.join(cache_dir, n)).st_blocks * 512 for n in os.listdir(cache_dir))


RANGES = [(1024, 4096), ((1 << 30) - 4096, 4 << 20), ((5 << 30) - 512, 8192), (200 << 20, 2 << 20),
          (17 << 30, 1 << 20)]


def test_lazy_open_reads_like_local(pushed, tmp_path):
    # no read-ahead: an open's header and index reads may queue a window per layer,
    # which would count in the bytes fetched at open
    cfg, svc = _configs(pushed, tmp_path, readahead=0)
    t0 = time.monotonic()
    image = assemble.open_image(str(cfg), svc)
    opened = time.monotonic() - t0
    try:
        assert (tmp_path / "result").read_text() == "success"
        fetched_at_open = _cached_bytes(tmp_path / "cache")
        total = sum(low["size"] for low in pushed["lowers"])
        assert fetched_at_open < total / 4, (fetched_at_open, total)
        with Image([open_layer(p) for p in pushed["files"]]) as local:
            assert image.virtual_size == local.virtual_size == 64 << 30
            for off, n in RANGES:
                assert image.read(off, n) == local.read(off, n), (off, n)
            for _ in range(40):
                off = rng.randrange(0, (6 << 30) // 512) * 512
                assert image.read(off, 64 << 10) == local.read(off, 64 << 10)
    finally:
        image.close()
    print(f"open took {opened:.3f}s, fetched {fetched_at_open} of {total} bytes at open")


def test_cache_survives_restart(pushed, tmp_path):
    cfg, svc = _configs(pushed, tmp_path)
    image = assemble.open_image(str(cfg), svc)
    want = [image.read(off, n) for off, n in RANGES]
    image.close()
    # the same cache through a proxy that counts what still reaches the registry
    with FaultProxy(pushed["reg"].url) as proxy:
        cfg2, svc2 = _configs(pushed, tmp_path, url=proxy.url)
        image = assemble.open_image(str(cfg2), svc2)
        try:
            assert [image.read(off, n) for off, n in RANGES] == want
        finally:
            image.close()
        data_gets = [s for s in proxy.seen if s[0] == "GET" and s[2] and s[2] != "bytes=0-0"]
        assert data_gets == [], data_gets


def test_corrupt_block_is_refetched_and_never_cached(pushed, tmp_path):
    with FaultProxy(pushed["reg"].url) as proxy:
        # no read-ahead: it stores bytes no read has checked yet (as the unread rest
        # of a unit), so a flip it fetched could stay cached until read
        cfg, svc = _configs(pushed, tmp_path, url=proxy.url, readahead=0)
        image = assemble.open_image(str(cfg), svc)
        try:
            with Image([open_layer(p) for p in pushed["files"]]) as local:
                # the next two answers for the ZFile layer carry a flipped byte (a raw
                # LSMT layer has no checksum to catch one: only ZFile blobs can heal)
                proxy.inject("flip", times=2, only=pushed["lowers"][1]["digest"])
                off, n = (1 << 30) + 8192, 256 << 10  # inside the ZFile layer's data
                assert image.read(off, n) == local.read(off, n)
                for off, n in RANGES:
                    assert image.read(off, n) == local.read(off, n)
            flips = [s for s in proxy.seen if s[3] == "flip"]
            assert flips, "the fault was never injected"
        finally:
            image.close()
    # every unit the cache holds equals the real blob
    for low, path in zip(pushed["lowers"], pushed["files"]):
        cpath = tmp_path / "cache" / low["digest"]
        real = open(path, "rb").read()
        cached = open(cpath, "rb").read()
        fd = os.open(cpath, os.O_RDONLY)
        try:
            pos = 0
            while pos < len(real):
                try:
                    b = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                e = os.lseek(fd, b, os.SEEK_HOLE)
                assert cached[b:e] == real[b:e], (path, b, e)
                pos = e
        finally:
            os.close(fd)


def test_registry_down_fails_within_deadline(pushed, tmp_path):
    with FaultProxy(pushed["reg"].url) as proxy:
        # no read-ahead: it could fetch the base layer's data while the image opens
        cfg, svc = _configs(pushed, tmp_path, url=proxy.url, deadline=2, readahead=0)
        image = assemble.open_image(str(cfg), svc)
        try:
            with open_layer(baselayer.path()) as base:    # base-layer data not cached yet
                data = [r for r in base.index.records() if not r[3]]
                off = data[len(data) // 2][0] * 512
            proxy.inject("500", times=None)
            t0 = time.monotonic()
            with pytest.raises(RemoteError):
                image.read(off, 4096)
            assert time.monotonic() - t0 < 2 * 3 + 2
            proxy.clear()
            assert image.read(1024, 1024)[56:58] == b"\x53\xef"   # works again
        finally:
            image.close()


def test_config_errors_for_remote_lowers(pushed, tmp_path):
    cfg, svc = _configs(pushed, tmp_path)
    doc = json.loads(cfg.read_text())
    doc["lowers"][1]["size"] += 1
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"lowers\[1\]\.size"):
        assemble.open_image(str(cfg), svc)
    assert (tmp_path / "result").read_text().startswith("failed:")
    doc["repoBlobUrl"] = ""
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="empty repoBlobUrl"):
        assemble.open_image(str(cfg), svc)
    doc["repoBlobUrl"] = f"{pushed['reg'].url}/v2/{REPO}/blobs"
    doc["lowers"][1]["digest"] = "sha256:" + "0" * 64
    doc["lowers"][1].pop("size")
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ObdError):
        assemble.open_image(str(cfg), svc)
    text = (tmp_path / "result").read_text()
    assert text.startswith("failed:failed to open remote file ") and "No such file or directory" in text


def test_blob_url_joins_like_overlaybd():
    assert blob_url("http://h/v2/r/blobs", "sha256:ab") == "http://h/v2/r/blobs/sha256:ab"
    assert blob_url("http://h/v2/r/blobs/", "sha256:ab") == "http://h/v2/r/blobs/sha256:ab"


def test_damaged_cache_block_heals_and_is_counted(pushed, tmp_path):
    """Bytes of a ZFile layer damaged on the cache disk after they were
    cached: the read evicts and refetches the blocks that fail their CRC,
    returns the right bytes, and tcmu_obd.stats (the exporter's
    tcmu_obd_crc_healed_total) counts the heal."""
    from tcmu_obd import stats
    cfg, svc = _configs(pushed, tmp_path)
    off, n = (1 << 30) + 8192, 256 << 10          # inside the ZFile layer's data
    image = assemble.open_image(str(cfg), svc)
    try:
        want = image.read(off, n)
    finally:
        image.close()
    low = pushed["lowers"][1]
    cpath = tmp_path / "cache" / low["digest"]
    fd = os.open(cpath, os.O_RDWR)
    try:           # flip a byte every 4 KiB of cached data, away from the headers and the index
        pos, flipped = 64 << 10, 0
        limit = low["size"] - (1 << 20) - (64 << 10)
        while pos < limit:
            try:
                b = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            e = min(os.lseek(fd, b, os.SEEK_HOLE), limit)
            for at in range(b, e, 4096):
                os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x5A]), at)
                flipped += 1
            pos = max(e, b + 1)
    finally:
        os.close(fd)
    assert flipped, "nothing cached to damage"
    before = stats.snapshot()["crc_healed"]
    image = assemble.open_image(str(cfg), svc)
    try:
        assert image.read(off, n) == want
    finally:
        image.close()
    assert stats.snapshot()["crc_healed"] > before
