"""The metrics endpoint scraped by a real Prometheus server: a `tcmu-obd
mount` daemon (FUSE, direct I/O) serves a lazily fetched image from a real
registry on loopback with exporterConfig enabled; Prometheus (Debian's
`prometheus`, started here on 127.0.0.1 with a temp config and data dir)
scrapes it every second while the test reads the disk; the series read back
through Prometheus's HTTP API (/api/v1/query) match the reads made: bytes
and requests, the per-device latency histogram, registry fetches, the
devices attached, the alive gauge.  Waits for a scrape are bounded and
polled; nothing is timed."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import commit_layer
from registry_server import Registry, free_port, require
from tcmu_obd.image.rw import RWLayer
from tcmu_obd.remote.distribution import BlobUploader
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings
from tcmu_obd.serve import blockdev, fuse

require("docker-registry")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "tcmu_obd.cli.mount"]
REPO = "obd/metrics"
READ = 65536            # one FUSE request each (direct I/O, below max_read)
DATA = 8 << 20          # bytes of data in the image's one layer, at offset 0
WAIT = 90.0             # upper bound for a scrape to show the expected values


def _prometheus():
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("the Prometheus server is not installed: apt-get install prometheus "
                    "(scripts/setup.sh installs it)")
    return path


def _missing_fuse():
    problems = blockdev.fuse_problems(("fusermount3",))
    return "; ".join(p for p, _ in problems) or None


pytestmark = pytest.mark.skipif(_missing_fuse() is not None, reason=str(_missing_fuse()))


def _push(reg, path):
    client = RegistryClient(RegistrySettings())
    try:
        up = BlobUploader(client, f"{reg.url}/v2/{REPO}/blobs/uploads/", chunk_size=1 << 20)
        with open(path, "rb") as f:
            up.write(f.read())
        return up.close(), os.path.getsize(path)
    finally:
        client.close()


class Prometheus:
    def __init__(self, tmp, target_port, prefix):
        self.port = free_port()
        self.dir = tmp / "prom"
        self.dir.mkdir()
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: obd\n    metrics_path: {prefix}\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
        self.log = open(self.dir / "log", "wb")
        self.proc = subprocess.Popen(
            [_prometheus(), f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=str(self.dir))

    def query(self, q):
        """The instant vector of query `q`: {frozenset(labels): value}."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return {frozenset((k, v) for k, v in s["metric"].items() if k not in ("instance", "job", "__name__")):
                float(s["value"][1]) for s in doc["data"]["result"]}

    def wait_for(self, q, ok, what):
        """Poll `q` until ok(result); fail after WAIT seconds with the last answer."""
        deadline = time.monotonic() + WAIT
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}: "
                            f"{(self.dir / 'log').read_text()[-2000:]}")
            try:
                last = self.query(q)
                if ok(last):
                    return last
            except (OSError, ValueError) as e:     # not listening yet
                last = e
            time.sleep(0.5)
        pytest.fail(f"{what}: `{q}` never matched within {WAIT:.0f} s; last answer {last!r}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _one(result):
    return next(iter(result.values())) if len(result) == 1 else None


def test_exporter_prometheus_scrapes_a_mount(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    port = free_port()
    data = os.urandom(DATA)          # incompressible, bigger than what opening a layer prefetches
    up = RWLayer.create(str(tmp_path / "up.d"), str(tmp_path / "up.i"), 1 << 30)
    up.write(data, 0)
    layer = commit_layer(up, str(tmp_path / "layer"))
    up.close()
    with Registry() as reg:
        digest, size = _push(reg, layer)
        svc = tmp_path / "overlaybd.json"
        svc.write_text(json.dumps({
            "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
            "exporterConfig": {"enable": True, "port": port, "uriPrefix": "/metrics"},
        }))
        cfg = tmp_path / "config.v1.json"
        cfg.write_text(json.dumps({"repoBlobUrl": f"{reg.url}/v2/{REPO}/blobs",
                                   "lowers": [{"digest": digest, "size": size}]}))
        r = subprocess.run(CLI + ["mount", str(cfg), str(mnt), "--direct-io", "--service-config", str(svc),
                                  "--log", str(tmp_path / "mount.log")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, (r.stdout, r.stderr)
        disk = r.stdout.strip()
        prom = Prometheus(tmp_path, port, "/metrics")
        try:
            node = socket.gethostname()
            dev = fuse.mount_at(str(mnt)) and str(mnt / "disk")
            prom.wait_for(f'OverlayBD_Alive{{node="{node}"}}', lambda v: _one(v) == 1, "alive gauge")
            base = prom.query('OverlayBD_Count{type="pread"}')
            base = _one(base) or 0.0
            offsets = [k * (1 << 20) for k in range(DATA >> 20)] + [(512 << 20) + k * READ for k in range(4)]
            fd = os.open(disk, os.O_RDONLY)
            try:
                for off in offsets:
                    assert os.pread(fd, READ, off) == (data[off:off + READ] or bytes(READ))
            finally:
                os.close(fd)
            want = base + len(offsets) * READ
            prom.wait_for('OverlayBD_Count{type="pread"}', lambda v: _one(v) == want, "pread bytes")
            # one FUSE request per read (direct I/O): the histogram saw exactly these
            count = prom.wait_for(f'tcmu_obd_device_latency_seconds_count{{device="{dev}"}}',
                                  lambda v: _one(v) == len(offsets), "latency histogram")
            buckets = prom.query(f'tcmu_obd_device_latency_seconds_bucket{{device="{dev}"}}')
            assert buckets[frozenset({("device", dev), ("le", "+Inf")})] == _one(count)
            assert _one(prom.query(f'OverlayBD_MaxLatency{{type="pread"}}')) is not None
            host = urllib.parse.urlsplit(reg.url).netloc
            fetched = prom.query(f'tcmu_obd_registry_fetched_bytes_total{{registry="{host}"}}')
            assert 0 < _one(fetched) <= size, fetched           # fetched lazily, never more than the blob
            assert _one(prom.query(f'tcmu_obd_registry_requests_total{{registry="{host}"}}')) >= 1
            assert _one(prom.query('OverlayBD_Count{type="download"}')) == _one(fetched)
            assert _one(prom.query("tcmu_obd_cache_fetch_reads_total")) >= 1
            assert _one(prom.query("tcmu_obd_devices_attached")) == 1
            assert _one(prom.query("tcmu_obd_cache_bytes")) > 0
            ratio = _one(prom.query("tcmu_obd_cache_hit_ratio"))
            assert 0 <= ratio < 1
        finally:
            prom.stop()
            subprocess.run(CLI + ["umount", str(mnt)], capture_output=True, timeout=60, cwd=ROOT)
    assert fuse.mount_at(str(mnt)) is None
