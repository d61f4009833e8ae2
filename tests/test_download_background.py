"""Background download (docs/runtime.md, Background download) against a real registry: remote
layers with a `dir` are fetched into <dir>/.download, checked against their
digest, renamed to overlaybd.commit and switched in, after which the image
reads them without the registry.  A corrupted download is never renamed nor
read; a later attempt fetches everything again.  A partial download resumes
after a restart without refetching its chunks; maxMBps throttles; two
devices never download the same dir at once."""
import json
import os
import shutil
import time

import pytest

from conftest import commit_layer
from registry_server import FaultProxy, Registry, require
from tcmu_obd.image import assemble, baselayer
from tcmu_obd import service_config
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.remote.distribution import BlobUploader
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings
from tcmu_obd.image.rw import RWLayer

require("docker-registry")
REPO = "obd/download-test"
BS = 262144


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("download"))
    with Registry() as reg:
        up = RWLayer.create(os.path.join(tmp, "l1.d"), os.path.join(tmp, "l1.i"), 64 << 30)
        up.write(os.urandom(2 << 20), 1 << 30)
        up.write(os.urandom(1 << 20), 5 << 30)
        l1 = commit_layer(up, os.path.join(tmp, "l1"), use_zfile=True, use_tar=True)   # ~3 MB
        up.close()
        files = [baselayer.path(), l1]
        client = RegistryClient(RegistrySettings())
        lowers = []
        for path in files:
            upl = BlobUploader(client, f"{reg.url}/v2/{REPO}/blobs/uploads/", chunk_size=1 << 20)
            with open(path, "rb") as f:
                upl.write(f.read())
            lowers.append({"digest": upl.close(), "size": os.path.getsize(path)})
        client.close()
        yield {"reg": reg, "files": files, "lowers": lowers}


def _configs(pushed, tmp_path, url, dirs=(0, 1), cache="cache", name="config.v1.json", readahead=8 << 20,
             **download):
    dl = {"enable": True, "delay": 0, "delayExtra": 1, "maxMBps": 0}
    dl.update(download)
    svc = tmp_path / "overlaybd.json"
    svc.write_text(json.dumps({
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / cache), "cacheSizeGB": 1,
                        "refillSize": 262144},
        "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")},
        "tcmuObd": {"registryTimeoutSec": 2, "registryRetries": 1, "readDeadlineSec": 3,
                    "readAheadBytes": readahead},
    }))
    lowers = [dict(low) for low in pushed["lowers"]]
    for i in dirs:
        lowers[i]["dir"] = str(tmp_path / f"layer{i}")
    cfg = tmp_path / name
    cfg.write_text(json.dumps({"repoBlobUrl": f"{url}/v2/{REPO}/blobs", "lowers": lowers,
                               "download": dl}))
    return str(cfg), service_config.load(str(svc))


def _local(pushed):
    return Image([open_layer(p) for p in pushed["files"]])


def _blob_gets(proxy, digest):
    """Data GETs of one blob (the 1-byte open probe left out), as (start, end)."""
    out = []
    for method, path, rng, _fault in list(proxy.seen):
        if method == "GET" and path.endswith(digest) and rng and rng != "bytes=0-0":
            a, b = rng.split("=")[1].split("-")
            out.append((int(a), int(b)))
    return out


def _chunks(size, bs=BS):
    return [(off, min(off + bs, size) - 1) for off in range(0, size, bs)]


def _present_chunks(path, size, bs=BS):
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(off, end) for off, end in _chunks(size, bs)
                if os.lseek(fd, off, os.SEEK_HOLE) >= end + 1]
    finally:
        os.close(fd)


def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


RANGES = [(1024, 4096), ((1 << 30) - 4096, 3 << 20), ((5 << 30) - 512, 8192), ((5 << 30) + 4096, 1 << 20)]


def test_download_switches_to_local_files(pushed, tmp_path):
    with FaultProxy(pushed["reg"].url) as proxy:
        cfg, svc = _configs(pushed, tmp_path, proxy.url)
        image = assemble.open_image(cfg, svc)
        try:
            dl = image.downloader
            assert dl is not None
            assert dl.wait(30), dl.status()
            st = dl.status()
            assert [s["state"] for s in st] == ["done", "done"], st
            assert [s["source"] for s in st] == ["download", "download"]
            for i, path in enumerate(pushed["files"]):
                d = tmp_path / f"layer{i}"
                assert (d / "overlaybd.commit").read_bytes() == open(path, "rb").read()
                assert not (d / ".download").exists()
                # the stack now reads this layer from the local file
                tag = len(image.lowers) - 1 - i
                assert _fd_path(image.stack.backings[tag].fd) == str(d / "overlaybd.commit")
                size = pushed["lowers"][i]["size"]
                assert set(_chunks(size)) <= set(_blob_gets(proxy, pushed["lowers"][i]["digest"]))
            # nothing reaches the registry any more: every blob request would fail
            proxy.inject("500", times=None, probes=True)
            before = len(proxy.seen)
            with _local(pushed) as local:
                for off, n in RANGES:
                    assert image.read(off, n) == local.read(off, n), (off, n)
                for k in range(30):
                    off = (k * 7919 * 4096) % (6 << 30)
                    assert image.read(off, 64 << 10) == local.read(off, 64 << 10)
            assert proxy.seen[before:] == []
        finally:
            image.close()
        assert not dl.running


def test_corrupt_download_is_never_used(pushed, tmp_path):
    digest, size = pushed["lowers"][1]["digest"], pushed["lowers"][1]["size"]
    d = tmp_path / "layer1"
    with FaultProxy(pushed["reg"].url) as proxy:
        # no read-ahead: a read-ahead request after open could take the one flip meant for the download
        cfg, svc = _configs(pushed, tmp_path, proxy.url, dirs=(1,), delay=1, tryCnt=1, readahead=0)
        image = assemble.open_image(cfg, svc)
        try:
            proxy.inject("flip")        # before the download starts (delay 1 s)
            old = image.stack.backings[0]
            assert image.downloader.wait(30)
            st = image.downloader.status()[0]
            assert st["state"] == "failed" and st["digest_failures"] == 1, st
            assert "sha256" in st["error"]
            assert [s for s in proxy.seen if s[3] == "flip"]
            assert not (d / "overlaybd.commit").exists()
            assert image.stack.backings[0] is old          # never switched
            with _local(pushed) as local:
                for off, n in RANGES:
                    assert image.read(off, n) == local.read(off, n)
        finally:
            image.close()
        # a restart: the first attempt finds every chunk present, fails the digest again,
        # and the next one fetches everything
        proxy.seen.clear()
        cfg, svc = _configs(pushed, tmp_path, proxy.url, dirs=(1,), tryCnt=3)
        image = assemble.open_image(cfg, svc)
        try:
            assert image.downloader.wait(30)
            st = image.downloader.status()[0]
            assert st["state"] == "done" and st["attempts"] == 2 and st["digest_failures"] == 1, st
            assert sorted(_blob_gets(proxy, digest)) == _chunks(size)
        finally:
            image.close()
    assert (d / "overlaybd.commit").read_bytes() == open(pushed["files"][1], "rb").read()
    assert not (d / ".download").exists()


def test_failed_digest_refetches_everything(pushed, tmp_path):
    digest, size = pushed["lowers"][1]["digest"], pushed["lowers"][1]["size"]
    with FaultProxy(pushed["reg"].url) as proxy:
        # no read-ahead: its requests after open would mix with the download's
        cfg, svc = _configs(pushed, tmp_path, proxy.url, dirs=(1,), delay=1, tryCnt=2, readahead=0)
        image = assemble.open_image(cfg, svc)
        try:
            at_open = len(proxy.seen)        # the cache's header/index reads
            proxy.inject("flip")
            assert image.downloader.wait(30)
            st = image.downloader.status()[0]
            assert st["state"] == "done" and st["attempts"] == 2 and st["digest_failures"] == 1, st
            assert st["fetched_chunks"] == 2 * len(_chunks(size)) and st["skipped_chunks"] == 0
            del proxy.seen[:at_open]
            gets = _blob_gets(proxy, digest)
            assert sorted(gets) == sorted(_chunks(size) * 2)
            with _local(pushed) as local:
                for off, n in RANGES:
                    assert image.read(off, n) == local.read(off, n)
        finally:
            image.close()
    commit = (tmp_path / "layer1" / "overlaybd.commit").read_bytes()
    assert commit == open(pushed["files"][1], "rb").read()


def test_resume_after_restart(pushed, tmp_path):
    digest, size = pushed["lowers"][1]["digest"], pushed["lowers"][1]["size"]
    part = tmp_path / "layer1" / ".download"
    with FaultProxy(pushed["reg"].url) as proxy:
        cfg, svc = _configs(pushed, tmp_path, proxy.url, dirs=(1,), maxMBps=1)
        image = assemble.open_image(cfg, svc)
        try:
            deadline = time.monotonic() + 20
            while image.downloader.status()[0]["fetched_chunks"] < 3:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            t0 = time.monotonic()
            image.close()
            assert time.monotonic() - t0 < 2          # stop is prompt
        assert image.downloader.status()[0]["state"] == "stopped"
        assert not (tmp_path / "layer1" / "overlaybd.commit").exists()
        present = _present_chunks(part, size)
        assert 3 <= len(present) < len(_chunks(size)), present
        fetched_first = set(_blob_gets(proxy, digest))
        assert set(present) <= fetched_first
    with FaultProxy(pushed["reg"].url) as proxy:
        cfg, svc = _configs(pushed, tmp_path, proxy.url, dirs=(1,))
        image = assemble.open_image(cfg, svc)
        try:
            assert image.downloader.wait(30)
            st = image.downloader.status()[0]
            assert st["state"] == "done", st
            assert st["skipped_chunks"] == len(present)
            gets = _blob_gets(proxy, digest)
            # the cache already holds the index, so only missing chunks were fetched
            assert sorted(gets) == sorted(set(_chunks(size)) - set(present))
        finally:
            image.close()
    assert (tmp_path / "layer1" / "overlaybd.commit").read_bytes() == open(pushed["files"][1], "rb").read()


def test_throttle(pushed, tmp_path):
    size = pushed["lowers"][1]["size"]
    assert size > 3_000_000
    with FaultProxy(pushed["reg"].url) as proxy:
        cfg, svc = _configs(pushed, tmp_path, proxy.url, dirs=(1,), maxMBps=1)
        image = assemble.open_image(cfg, svc)
        t0 = time.monotonic()
        try:
            assert image.downloader.wait(30)
            took = time.monotonic() - t0
            assert image.downloader.status()[0]["state"] == "done"
        finally:
            image.close()
    assert took >= 2.0, took            # ~3 MB at 1 MiB/s; no upper bound on purpose


def test_existing_commit_is_used_on_open(pushed, tmp_path):
    d = tmp_path / "layer1"
    d.mkdir()
    shutil.copyfile(pushed["files"][1], d / "overlaybd.commit")
    with FaultProxy(pushed["reg"].url) as proxy:
        cfg, svc = _configs(pushed, tmp_path, proxy.url, dirs=(1,))
        image = assemble.open_image(cfg, svc)
        try:
            assert image.lowers[1].path == str(d / "overlaybd.commit")
            assert image.downloader is None          # nothing remote with a dir to fetch
            with _local(pushed) as local:
                for off, n in RANGES:
                    assert image.read(off, n) == local.read(off, n)
        finally:
            image.close()
        assert not [s for s in proxy.seen if s[1].endswith(pushed["lowers"][1]["digest"])]


def test_two_devices_share_a_dir(pushed, tmp_path):
    """The per-dir lock: one device downloads, the other switches to its result."""
    size = pushed["lowers"][1]["size"]
    with FaultProxy(pushed["reg"].url) as proxy:
        cfg_a, svc_a = _configs(pushed, tmp_path, proxy.url, dirs=(1,), name="a.json")
        cfg_b, svc_b = _configs(pushed, tmp_path, proxy.url, dirs=(1,), name="b.json", cache="cache-b")
        a = assemble.open_image(cfg_a, svc_a)
        b = assemble.open_image(cfg_b, svc_b)
        try:
            assert a.downloader.wait(30) and b.downloader.wait(30)
            sts = [a.downloader.status()[0], b.downloader.status()[0]]
            assert [s["state"] for s in sts] == ["done", "done"], sts
            assert sorted(s["source"] for s in sts) == ["download", "existing"], sts
            assert sum(s["fetched_chunks"] for s in sts) == len(_chunks(size))
            with _local(pushed) as local:
                for off, n in RANGES:
                    assert a.read(off, n) == b.read(off, n) == local.read(off, n)
        finally:
            a.close()
            b.close()
