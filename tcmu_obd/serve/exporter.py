"""The Prometheus metrics endpoint of `exporterConfig` (docs/operations.md,
Metrics): an HTTP server on `port` (all addresses) answering GET under
`uriPrefix` with the Prometheus text format, built by prometheus_client at
scrape time from counters that already exist.

Sources, all read when a scrape arrives: tcmu_obd.stats (registry fetches,
reads that fetched, CRC heals, FUSE reads), each TCMU ring's C counters and
latency histogram (Device.stats(), Device.latency()), each FUSE disk's
latency histogram, and the blob caches' sizes.  Nothing here runs on the
read path; a scrape takes the GIL, a GIL-free TCMU read never does.

overlaybd's series keep its names, spelling included (`OverlayBD_Read_Throughtput`),
with the hostname in `node` and pread/download in `type`.  Rates and the
largest latency cover the time since the previous scrape (overlaybd's
updateInterval is parsed but, as there, not used).

Not for: pushing to a gateway, TLS or auth on the endpoint, per-layer series.
"""
import http.server
import logging
import math
import socket
import threading
import time

from tcmu_obd import stats
from tcmu_obd.errors import UsageError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _prom():
    try:
        import prometheus_client
        from prometheus_client import core
    except ImportError as e:
        raise UsageError(f"exporterConfig.enable = true needs the prometheus_client package "
                         f"(pip install prometheus_client): {e}") from None
    return prometheus_client, core


class Collector:
    """A prometheus_client collector over this process's counters.
    tcmu_devices(): {name: _tcmu.Device}; fuse_disks(): {name: fuse.DiskOps}."""

    def __init__(self, tcmu_devices=dict, fuse_disks=dict, node=None):
        self.tcmu_devices = tcmu_devices
        self.fuse_disks = fuse_disks
        self.node = node or socket.gethostname()
        self.lock = threading.Lock()
        self.last = None            # (monotonic time, {tag: (count, bytes)}) of the previous scrape

    def _io(self, snap, devs):
        """{tag: (requests, bytes, largest latency in µs since the previous scrape)}."""
        pread, down = snap["pread"], snap["download"]
        n, b = pread["count"], pread["bytes"]
        mx = 0.0
        for d in devs.values():
            st = d.stats()
            n += st["reads"]
            b += st["bytes_read"]
            mx = max(mx, d.latency(reset_max=True)[3] * 1e6)
        return {"pread": (n, b, max(mx, pread["win_max_ns"] / 1e3)),
                "download": (down["count"], down["bytes"], down["win_max_ns"] / 1e3)}

    def collect(self):
        _, core = _prom()
        G, C, H = core.GaugeMetricFamily, core.CounterMetricFamily, core.HistogramMetricFamily
        snap = stats.snapshot(window=True)
        devs, disks = dict(self.tcmu_devices()), dict(self.fuse_disks())
        with self.lock:
            now = time.monotonic()
            io = self._io(snap, devs)
            prev, self.last = self.last, (now, {t: v[:2] for t, v in io.items()})
        dt = now - prev[0] if prev else 0.0

        alive = G("OverlayBD_Alive", "the exporter's process is serving", labels=["node"])
        alive.add_metric([self.node], 1)
        yield alive
        fams = {
            "OverlayBD_Read_Throughtput": G("OverlayBD_Read_Throughtput",
                                            "bytes read per second since the previous scrape "
                                            "(overlaybd's spelling)", labels=["node", "type"]),
            "OverlayBD_QPS": G("OverlayBD_QPS", "reads per second since the previous scrape",
                               labels=["node", "type"]),
            "OverlayBD_MaxLatency": G("OverlayBD_MaxLatency", "largest read latency (µs) since the "
                                      "previous scrape", labels=["node", "type"]),
            "OverlayBD_Count": G("OverlayBD_Count", "bytes read in total", labels=["node", "type"]),
        }
        for tag, (n, b, mx) in io.items():
            pn, pb = prev[1][tag] if prev else (n, b)
            fams["OverlayBD_Read_Throughtput"].add_metric([self.node, tag], (b - pb) / dt if dt > 0 else 0.0)
            fams["OverlayBD_QPS"].add_metric([self.node, tag], (n - pn) / dt if dt > 0 else 0.0)
            fams["OverlayBD_MaxLatency"].add_metric([self.node, tag], mx)
            fams["OverlayBD_Count"].add_metric([self.node, tag], b)
        yield from fams.values()

        g = G("tcmu_obd_devices_attached", "devices served by this process (TCMU rings and FUSE disks)")
        g.add_metric([], len(devs) + len(disks))
        yield g
        g = G("tcmu_obd_cache_bytes", "bytes the blob caches of this process hold on disk")
        g.add_metric([], stats.cache_bytes())
        yield g
        reads = io["pread"][0]
        c = C("tcmu_obd_cache_reads", "device reads (TCMU and FUSE)")
        c.add_metric([], reads)
        yield c
        c = C("tcmu_obd_cache_fetch_reads", "reads that had to fetch missing bytes from a registry first")
        c.add_metric([], snap["fetch_reads"])
        yield c
        g = G("tcmu_obd_cache_hit_ratio", "fraction of device reads served without fetching "
              "(NaN before the first read)")
        g.add_metric([], max(0.0, 1.0 - snap["fetch_reads"] / reads) if reads else math.nan)
        yield g
        regs = snap["registries"]
        for name, key, what in (("tcmu_obd_registry_fetched_bytes", "bytes", "blob bytes fetched"),
                                ("tcmu_obd_registry_requests", "requests", "range requests sent"),
                                ("tcmu_obd_registry_retries", "retries", "retries after a failed attempt"),
                                ("tcmu_obd_registry_errors", "errors", "operations that gave up")):
            c = C(name, f"{what}, per registry host", labels=["registry"])
            for host, r in sorted(regs.items()):
                c.add_metric([host], r[key])
            yield c
        c = C("tcmu_obd_crc_healed", "cached blocks that failed their check and read fine once refetched")
        c.add_metric([], snap["crc_healed"])
        yield c

        cmds = C("tcmu_obd_scsi_commands", "SCSI commands per TCMU device", labels=["device", "kind"])
        errs = C("tcmu_obd_scsi_errors", "SCSI commands completed with a non-GOOD status",
                 labels=["device"])
        lat = H("tcmu_obd_device_latency_seconds", "command latency per device: TCMU ring to "
                "completion, or one FUSE read", labels=["device"])
        for name, d in sorted(devs.items()):
            st = d.stats()
            for kind, key in (("read", "reads"), ("write", "writes"), ("other", "other")):
                cmds.add_metric([name, kind], st[key])
            errs.add_metric([name], st["errors"])
            bounds, counts, total, _ = d.latency()
            lat.add_metric([name], _buckets(bounds, counts), total)
        for name, ops in sorted(disks.items()):
            bounds, counts, total = ops.latency.value()
            lat.add_metric([name], _buckets(bounds, counts), total)
        yield cmds
        yield errs
        yield lat


def _buckets(bounds, counts):
    """Per-bucket counts to prometheus_client's cumulative (le, count) pairs."""
    out, acc = [], 0
    for b, n in zip(list(bounds) + [math.inf], counts):
        acc += n
        out.append(("+Inf" if b == math.inf else repr(float(b)), acc))
    return out


class Exporter:
    """The HTTP server: start() binds (port in use: UsageError naming
    exporterConfig.port) and serves in a thread; stop() closes it."""

    def __init__(self, exporter_cfg, collector, address="0.0.0.0"):
        self.cfg = exporter_cfg
        self.prefix = exporter_cfg.uri_prefix or "/"
        self.address = address
        prometheus_client, _ = _prom()
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.render = prometheus_client.generate_latest
        self.server = None
        self.thread = None

    @property
    def port(self):
        return self.server.server_address[1] if self.server else self.cfg.port

    def start(self):
        exp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if not path.startswith(exp.prefix):
                    self.send_error(404, f"metrics are under {exp.prefix}")
                    return
                try:
                    body = exp.render(exp.registry)
                except Exception as e:     # noqa: BLE001 -- a scrape must answer, and say why not
                    log.exception("metrics scrape failed")
                    self.send_error(500, f"collecting metrics failed: {e}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("exporter: " + fmt, *args)

        try:
            self.server = http.server.ThreadingHTTPServer((self.address, self.cfg.port), Handler)
        except OSError as e:
            raise UsageError(f"exporterConfig.port = {self.cfg.port}: cannot listen on "
                             f"{self.address}:{self.cfg.port}: {e.strerror}") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="obd-exporter", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d%s", self.address, self.port, self.prefix)
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()
            self.server = None


def start(service_cfg, tcmu_devices=dict, fuse_disks=dict, address="0.0.0.0"):
    """The running Exporter when service_cfg's exporterConfig.enable, else None."""
    ec = service_cfg.exporter_config
    if not ec.enable:
        return None
    return Exporter(ec, Collector(tcmu_devices, fuse_disks), address).start()
