"""The metrics endpoint directly, without Prometheus: an Exporter over a real
FUSE-less DiskOps reading a real image (the bundled base layer) and the
daemon's exporter wiring (Daemon's device source) serve the Prometheus text
format under uriPrefix, with overlaybd's names and labels and values that
match the reads made; other paths are 404; a port in use and a bad
uriPrefix are clear errors; exporterConfig.enable is no longer refused."""
import json
import math
import socket
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from registry_server import free_port
from tcmu_obd import service_config as sc
from tcmu_obd import stats
from tcmu_obd.errors import ConfigError, UsageError
from tcmu_obd.image import baselayer
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.stack import Image
from tcmu_obd.serve import exporter, fuse


def _cfg(port, prefix="/metrics"):
    return sc.from_dict({"exporterConfig": {"enable": True, "port": port, "uriPrefix": prefix}})


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


def _samples(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def disk():
    image = Image([open_layer(baselayer.path())])
    ops = fuse.DiskOps(image)
    yield ops
    image.close()


def _fuse_read(ops, offset, n):
    """One FUSE read request as libfuse makes it: into a C buffer."""
    import ctypes
    buf = ctypes.create_string_buffer(n)
    return ops.read_to(ctypes.addressof(buf), n, offset)


def test_exporter_text_format_and_values(disk):
    port = free_port()
    exp = exporter.start(_cfg(port), fuse_disks=lambda: {"/mnt/x/disk": disk}, address="127.0.0.1")
    try:
        status, ctype, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        before = _samples(text)
        node = socket.gethostname()
        assert before[("OverlayBD_Alive", (("node", node),))] == 1
        assert "# TYPE OverlayBD_Read_Throughtput gauge" in text      # overlaybd's spelling, kept
        c0 = before[("OverlayBD_Count", (("node", node), ("type", "pread")))]
        h0 = before.get(("tcmu_obd_device_latency_seconds_count", (("device", "/mnt/x/disk"),)), 0)
        sizes = [4096, 65536, 1000, 131072]          # one unaligned: widened inside, counted as asked
        for k, n in enumerate(sizes):
            assert _fuse_read(disk, k * (1 << 20) + 7 * (k == 2), n) == n
        after = _samples(_get(f"http://127.0.0.1:{port}/metrics/sub?x=1")[2])   # any path under the prefix
        key = (("node", node), ("type", "pread"))
        assert after[("OverlayBD_Count", key)] - c0 == sum(sizes)
        assert after[("OverlayBD_QPS", key)] > 0 and after[("OverlayBD_Read_Throughtput", key)] > 0
        assert after[("OverlayBD_MaxLatency", key)] > 0
        dev = (("device", "/mnt/x/disk"),)
        assert after[("tcmu_obd_device_latency_seconds_count", dev)] - h0 == len(sizes)
        assert after[("tcmu_obd_device_latency_seconds_bucket", dev + (("le", "+Inf"),))] - h0 == len(sizes)
        assert after[("tcmu_obd_devices_attached", ())] == 1
        for name in ("OverlayBD_QPS", "OverlayBD_Count", "OverlayBD_MaxLatency"):
            assert (name, (("node", node), ("type", "download"))) in after
        ratio = after[("tcmu_obd_cache_hit_ratio", ())]
        assert 0.0 <= ratio <= 1.0 and not math.isnan(ratio)
        # a third scrape with no reads in between: no rate, no latency in the window
        quiet = _samples(_get(f"http://127.0.0.1:{port}/metrics")[2])
        assert quiet[("OverlayBD_QPS", key)] == 0 and quiet[("OverlayBD_MaxLatency", key)] == 0
        assert quiet[("OverlayBD_Count", key)] == after[("OverlayBD_Count", key)]
        with pytest.raises(urllib.error.HTTPError) as info:
            _get(f"http://127.0.0.1:{port}/other")
        assert info.value.code == 404
    finally:
        exp.stop()


def test_exporter_text_registry_counters_per_host():
    """Counters fed through tcmu_obd.stats show up per registry host."""
    stats.registry_request("http://127.0.0.9:5999/v2/r/blobs/sha256:aa")
    stats.registry_read("http://127.0.0.9:5999/v2/r/blobs/sha256:aa", 1234, 5000)
    stats.registry_retry("http://127.0.0.9:5999/v2/r/blobs/sha256:aa")
    stats.registry_error("http://127.0.0.9:5999/v2/r/blobs/sha256:aa")
    port = free_port()
    exp = exporter.start(_cfg(port, "/m"), address="127.0.0.1")
    try:
        s = _samples(_get(f"http://127.0.0.1:{port}/m")[2])
    finally:
        exp.stop()
    reg = (("registry", "127.0.0.9:5999"),)
    assert s[("tcmu_obd_registry_fetched_bytes_total", reg)] >= 1234
    for name in ("requests", "retries", "errors"):
        assert s[(f"tcmu_obd_registry_{name}_total", reg)] >= 1


def test_exporter_text_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"exporterConfig.port = {port}: cannot listen"):
            exporter.start(_cfg(port), address="127.0.0.1")


def test_exporter_text_bad_prefix_refused(tmp_path):
    path = tmp_path / "overlaybd.json"
    path.write_text(json.dumps({"exporterConfig": {"enable": True, "uriPrefix": "metrics"}}))
    with pytest.raises(ConfigError, match=r"exporterConfig.uriPrefix = \"metrics\": must start with '/'"):
        sc.load(str(path))


def test_exporter_text_disabled_starts_nothing():
    assert exporter.start(sc.from_dict({})) is None


def test_exporter_text_daemon_serves_its_devices():
    """The daemon's exporter: Daemon.start() binds it from exporterConfig
    (here without a kernel: the Daemon's device source over no context)."""
    daemon = pytest.importorskip("tcmu_obd.serve.daemon")
    port = free_port()
    try:
        d = daemon.Daemon(_cfg(port), workers=1, dbus="no", pid_file="")
    except ImportError as e:
        pytest.fail(f"the TCMU module is not built: {e}")
    d.metrics = exporter.start(d.cfg, tcmu_devices=d._devices, address="127.0.0.1")
    try:
        s = _samples(_get(f"http://127.0.0.1:{port}/metrics")[2])
        assert s[("tcmu_obd_devices_attached", ())] == 0
        assert s[("OverlayBD_Alive", (("node", socket.gethostname()),))] == 1
    finally:
        d.stop()
    assert d.metrics is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(stats.LAT_BOUNDS), st.floats(0, 10, allow_nan=False))))
def test_exporter_text_histogram_matches_model(latencies):
    """The FUSE histogram as exported: bucket le=b counts the latencies <= b."""
    h = stats.Hist()
    for x in latencies:
        h.observe(x)
    bounds, counts, total = h.value()
    got = exporter._buckets(bounds, counts)
    want = [(repr(float(b)), sum(1 for x in latencies if x <= b)) for b in bounds] + [("+Inf", len(latencies))]
    assert got == want
    assert total == pytest.approx(sum(latencies))
