"""TurboOCI lowers whose target comes from a real registry on loopback
(targetDigest: repoBlobUrl/<digest>, size from the registry): the meta layer
local or remote, only the target ranges a read needs are fetched (counted at
a proxy), a digest the registry lacks fails the open with its URL in the
resultFile; and .tar.gz targets through their gzip index, with and without
the gzip cache (fill, reuse after a restart with an empty blob cache,
eviction under a tiny cacheSizeGB), never serving wrong bytes."""
import dataclasses
import gzip
import json
import os
import random

import pytest

from registry_server import FaultProxy, Registry, require
from test_remote_image import REPO, _upload
from warp_layers import model_warp, write_warp_layer
from tcmu_obd import service_config
from tcmu_obd.errors import ObdError
from tcmu_obd.format import gzindex
from tcmu_obd.image import assemble, warp
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings

require("docker-registry")

SECTOR = 512
VSIZE = 16 << 20
UNIT = 262144                   # the blob cache's refillSize below
rng = random.Random(11)


def _tar_like(n):
    """Compressible but not trivial (gzip emits real Huffman blocks, non-zero bits)."""
    words = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(3, 12))) for _ in range(400)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


# tag-1 records (sectors): near the start, in the middle, and one running past the tar's end
TLEN = (6 << 20) + 300
RECS = [(0, 16, "meta", None), (64, 2048, "target", 0), (4096, 1000, "target", 6000),
        (6000, 40, "zero", None), (8192, 16, "target", TLEN // SECTOR - 3)]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warpreg")
    target = _tar_like(TLEN)
    (tmp / "layer.tar").write_bytes(target)
    (tmp / "layer.tar.gz").write_bytes(gzip.compress(target, 6))
    with open(tmp / "layer.tar.gz", "rb") as f:
        gzindex.build_index(f, tmp / "gzip.meta", span=1 << 16)
    recs = [(o, n, k, os.urandom(n * SECTOR) if k == "meta" else x) for o, n, k, x in RECS]
    meta = write_warp_layer(tmp / "ext4.fs.meta", VSIZE, recs, use_zfile=True, use_tar=True)
    model = model_warp(bytearray(VSIZE), recs, target)
    with Registry() as reg:
        client = RegistryClient(RegistrySettings())
        digests = {name: _upload(client, reg.url, tmp / name)
                   for name in ("layer.tar", "layer.tar.gz", "ext4.fs.meta")}
        client.close()
        yield {"reg": reg, "tmp": tmp, "meta": meta, "model": bytes(model), "digests": digests}


def _svc(tmp_path, cache="cache", gz=None):
    doc = {"cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / cache), "cacheSizeGB": 1,
                           "refillSize": UNIT},
           "tcmuObd": {"registryTimeoutSec": 2, "registryRetries": 1, "readDeadlineSec": 20}}
    if gz is not None:
        doc["gzipCacheConfig"] = {"enable": True, "cacheDir": str(tmp_path / gz), "cacheSizeGB": 1,
                                  "refillSize": 1 << 16}
    (tmp_path / "overlaybd.json").write_text(json.dumps(doc))
    return service_config.load(str(tmp_path / "overlaybd.json"))


def _cfg(pushed, tmp_path, url, lower, name="config.v1.json"):
    cfg = tmp_path / name
    cfg.write_text(json.dumps({"repoBlobUrl": f"{url}/v2/{REPO}/blobs", "lowers": [lower],
                               "resultFile": str(tmp_path / "result")}))
    return str(cfg)


def _fetched(proxy, digest):
    """(start, end) byte ranges of the blob's data GETs that reached the proxy."""
    out = []
    for method, path, rng_, _fault in proxy.seen:
        if method == "GET" and path.endswith(digest) and rng_ and rng_ != "bytes=0-0":
            a, b = rng_.split("=")[1].split("-")
            out.append((int(a), int(b) + 1))
    return out


@pytest.mark.parametrize("meta_remote", [False, True])
def test_warp_registry_target_fetches_only_what_is_read(pushed, tmp_path, meta_remote):
    tdig, tsize = pushed["digests"]["layer.tar"]
    lower = {"targetDigest": tdig}
    if meta_remote:
        lower.update(digest=pushed["digests"]["ext4.fs.meta"][0], size=pushed["digests"]["ext4.fs.meta"][1])
    else:
        lower["file"] = pushed["meta"]
    with FaultProxy(pushed["reg"].url) as proxy:
        image = assemble.open_image(_cfg(pushed, tmp_path, proxy.url, lower), _svc(tmp_path))
        try:
            assert (tmp_path / "result").read_text() == "success"
            assert _fetched(proxy, tdig) == []                 # opening needs the size (HEAD) only
            assert image.read(64 * SECTOR + 8192, 4096) == pushed["model"][64 * SECTOR + 8192:][:4096]
            got = _fetched(proxy, tdig)
            assert got and all(a >= 0 and b <= UNIT for a, b in got), got      # one unit: [0, UNIT)
            # the piece running past the tar's end: the tar's last bytes, then zeros
            off = 8192 * SECTOR
            assert image.read(off, 16 * SECTOR) == pushed["model"][off:off + 16 * SECTOR]
            tail = TLEN % SECTOR + 3 * SECTOR          # the tar bytes the record still covers
            assert pushed["model"][off + tail:off + 16 * SECTOR] == bytes(16 * SECTOR - tail)
            assert any(pushed["model"][off:off + tail])
            assert image.read(0, VSIZE) == pushed["model"]
            assert sum(b - a for a, b in _fetched(proxy, tdig)) <= tsize + UNIT
        finally:
            image.close()


def test_warp_registry_missing_target_digest(pushed, tmp_path):
    missing = "sha256:" + "ab" * 32
    cfg = _cfg(pushed, tmp_path, pushed["reg"].url, {"file": pushed["meta"], "targetDigest": missing})
    with pytest.raises(ObdError):
        assemble.open_image(cfg, _svc(tmp_path))
    text = (tmp_path / "result").read_text()
    assert text.startswith("failed:") and f"/v2/{REPO}/blobs/{missing}" in text, text
    cfg = _cfg(pushed, tmp_path, pushed["reg"].url, {"file": pushed["meta"], "targetDigest": "sha256:12"})
    with pytest.raises(ObdError, match=r"lowers\[0\]\.targetDigest = 'sha256:12': expected sha256:<64 hex"):
        assemble.open_image(cfg, _svc(tmp_path))
    assert "targetDigest = 'sha256:12'" in (tmp_path / "result").read_text()


def _gz_lower(pushed):
    return {"file": pushed["meta"], "targetDigest": pushed["digests"]["layer.tar.gz"][0],
            "gzipIndex": str(pushed["tmp"] / "gzip.meta")}


def test_warp_registry_gzip_target_without_cache(pushed, tmp_path):
    gdig, gsize = pushed["digests"]["layer.tar.gz"]
    with FaultProxy(pushed["reg"].url) as proxy:
        image = assemble.open_image(_cfg(pushed, tmp_path, proxy.url, _gz_lower(pushed)), _svc(tmp_path))
        try:
            assert image.read(64 * SECTOR, 8192) == pushed["model"][64 * SECTOR:][:8192]
            assert 0 < sum(b - a for a, b in _fetched(proxy, gdig)) <= 2 * UNIT   # not the whole blob
            assert image.read(0, VSIZE) == pushed["model"]
        finally:
            image.close()
    assert not (tmp_path / "gz").exists()


def test_warp_registry_gzip_cache_fill_and_restart(pushed, tmp_path):
    gdig, _gsize = pushed["digests"]["layer.tar.gz"]
    reads = [(64 * SECTOR, 1 << 20), (4096 * SECTOR, 1000 * SECTOR), (8192 * SECTOR, 16 * SECTOR)]
    image = assemble.open_image(_cfg(pushed, tmp_path, pushed["reg"].url, _gz_lower(pushed)),
                                _svc(tmp_path, gz="gz"))
    try:
        for off, n in reads:
            assert image.read(off, n) == pushed["model"][off:off + n]
    finally:
        image.close()
    gfile = tmp_path / "gz" / gdig
    assert gfile.exists() and (tmp_path / "gz" / (gdig + ".presence")).exists()
    assert os.path.getsize(gfile) == TLEN                     # the decompressed stream, sparse
    # restart with an empty blob cache: what was read comes from the gzip cache, no registry GET
    with FaultProxy(pushed["reg"].url) as proxy:
        image = assemble.open_image(_cfg(pushed, tmp_path, proxy.url, _gz_lower(pushed)),
                                    _svc(tmp_path, cache="cache2", gz="gz"))
        try:
            for off, n in reads:
                assert image.read(off, n) == pushed["model"][off:off + n]
            assert _fetched(proxy, gdig) == []
        finally:
            image.close()


def test_warp_registry_gzip_cache_evicts_under_tiny_size(pushed, tmp_path):
    svc = _svc(tmp_path, gz="gzsmall")
    tiny = dataclasses.replace(svc.gzip_cache_config, cache_size_gb=(1 << 20) / (1 << 30))    # 1 MiB
    svc = dataclasses.replace(svc, gzip_cache_config=tiny)
    image = assemble.open_image(_cfg(pushed, tmp_path, pushed["reg"].url, _gz_lower(pushed)), svc)
    try:
        for _ in range(2):
            assert image.read(0, VSIZE) == pushed["model"]
        cache = warp.gzip_cache(tiny)
        assert cache.evictions > 0 and cache.used <= cache.capacity + (1 << 20)
        gfile = tmp_path / "gzsmall" / pushed["digests"]["layer.tar.gz"][0]
        assert os.stat(gfile).st_blocks * 512 <= 3 << 20                # far less than the 6 MiB stream
    finally:
        image.close()


def test_warp_registry_background_download_of_a_meta_layer(pushed, tmp_path):
    """A remote warp meta layer with a dir is downloaded and switched in at its
    own file number (2 here: the warp lower above it holds files 0 and 1),
    its target staying remote; reads are the model before and after."""
    tdig = pushed["digests"]["layer.tar"][0]
    mdig, msize = pushed["digests"]["ext4.fs.meta"]
    target = (pushed["tmp"] / "layer.tar").read_bytes()
    top_recs = [(20000, 8, "target", 100), (20010, 4, "meta", b"t" * 2048)]
    top = write_warp_layer(tmp_path / "top.meta", VSIZE, top_recs)
    model = model_warp(bytearray(pushed["model"]), top_recs, target)
    svc = _svc(tmp_path)
    cfg = tmp_path / "dl.json"
    cfg.write_text(json.dumps({
        "repoBlobUrl": f"{pushed['reg'].url}/v2/{REPO}/blobs",
        "lowers": [{"digest": mdig, "size": msize, "dir": str(tmp_path / "layer0"), "targetDigest": tdig},
                   {"file": top, "targetFile": str(pushed["tmp"] / "layer.tar")}],
        "download": {"enable": True, "delay": 0, "delayExtra": 1, "maxMBps": 0}}))
    image = assemble.open_image(str(cfg), svc)
    try:
        assert image.layer_tag(0) == 2 and image.layer_tag(1) == 0
        assert image.read(0, VSIZE) == bytes(model)
        dl = image.downloader
        assert dl is not None and dl.wait(30), dl.status()
        assert [s["state"] for s in dl.status()] == ["done"] and dl.status()[0]["tag"] == 2
        assert (tmp_path / "layer0" / "overlaybd.commit").read_bytes() == open(pushed["meta"], "rb").read()
        assert image.stack.backings[2] is image.lowers[0].backing
        assert image.stack.backings[3] is image.lowers[0].target            # still the remote target
        assert image.read(0, VSIZE) == bytes(model)
    finally:
        image.close()
