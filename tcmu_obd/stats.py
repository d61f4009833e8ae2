"""Process-wide counters behind the Prometheus exporter: registry fetches
(bytes, requests, retries, give-ups per registry host), reads that needed a
fetch, CRC failures healed, and the "pread" figures of the FUSE front end
(one update per FUSE request, in the one Python call a request already is).

It keeps plain integers under one lock and nothing else: no HTTP, no metric
names, no Prometheus types (tcmu_obd.serve.exporter reads these and the TCMU
rings' C counters at scrape time).  It is not on the GIL-free read path:
nothing here is called per byte, nor from a read the core serves without the
GIL; the callers are the paths that already hold it (an HTTP request, a
core read that fell back to Python, a FUSE request).
"""
import bisect
import threading
import urllib.parse
import weakref

_lock = threading.Lock()


class _Io:
    """Totals of one kind of read (overlaybd's "pread" or "download"):
    requests, bytes, the summed and the largest latency in nanoseconds, and
    the largest since the last snapshot(window=True)."""
    __slots__ = ("count", "bytes", "ns", "max_ns", "win_max_ns")

    def __init__(self):
        self.count = self.bytes = self.ns = self.max_ns = self.win_max_ns = 0

    def add(self, nbytes, ns):
        self.count += 1
        self.bytes += nbytes
        self.ns += ns
        if ns > self.max_ns:
            self.max_ns = ns
        if ns > self.win_max_ns:
            self.win_max_ns = ns


class _Registry:
    __slots__ = ("requests", "bytes", "retries", "errors")

    def __init__(self):
        self.requests = self.bytes = self.retries = self.errors = 0


LAT_BOUNDS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
              250e-3, 500e-3, 1.0, 2.5)      # seconds; the TCMU rings' C histogram uses the same


class Hist:
    """A latency histogram over LAT_BOUNDS (per-bucket counts, +Inf last),
    for a front end whose requests are Python calls anyway (FUSE)."""
    __slots__ = ("counts", "sum")

    def __init__(self):
        self.counts = [0] * (len(LAT_BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, seconds):
        with _lock:
            self.counts[bisect.bisect_left(LAT_BOUNDS, seconds)] += 1
            self.sum += seconds

    def value(self):
        with _lock:
            return list(LAT_BOUNDS), list(self.counts), self.sum


download = _Io()            # successful range reads from a registry
pread = _Io()               # FUSE reads (TCMU rings keep their own in C)
registries = {}             # host[:port] -> _Registry
fetch_reads = 0             # core reads that had to fetch missing bytes first
_caches = weakref.WeakSet()  # FileCache objects, for cache_bytes()
crc_healed = 0              # blocks that failed their check, were refetched, and then read fine


def host_of(url):
    """The registry label of a URL: its host[:port]."""
    return urllib.parse.urlsplit(url).netloc or url


def _reg(url):
    host = host_of(url)
    r = registries.get(host)
    if r is None:
        r = registries[host] = _Registry()
    return r


def registry_request(url):
    """An HTTP range read (one attempt) was sent to the registry of `url`."""
    with _lock:
        _reg(url).requests += 1


def registry_read(url, nbytes, ns):
    """A range read from `url` returned `nbytes` after `ns` nanoseconds."""
    with _lock:
        _reg(url).bytes += nbytes
        download.add(nbytes, ns)


def registry_retry(url):
    with _lock:
        _reg(url).retries += 1


def registry_error(url):
    """An operation on `url` gave up (its error reaches the caller)."""
    with _lock:
        _reg(url).errors += 1


def read_fetched(healed):
    """A core read that needed fetching (`healed`: blocks that failed their
    check and were refetched during it, then read fine)."""
    global fetch_reads, crc_healed
    with _lock:
        fetch_reads += 1
        crc_healed += healed


def read_healed(healed):
    global crc_healed
    with _lock:
        crc_healed += healed


def pread_done(nbytes, ns, hist=None):
    """One FUSE read of `nbytes` that took `ns`; also observed in `hist` (one lock for both)."""
    with _lock:
        pread.add(nbytes, ns)
        if hist is not None:
            hist.counts[bisect.bisect_left(LAT_BOUNDS, ns / 1e9)] += 1
            hist.sum += ns / 1e9


def track_cache(cache):
    """Count `cache` (anything with `dir` and `used`) in cache_bytes() while it lives."""
    with _lock:
        _caches.add(cache)


def cache_bytes():
    """Bytes on disk of the tracked caches, each directory once."""
    with _lock:
        caches = list(_caches)
    return sum({c.dir: c.used for c in caches}.values())


def snapshot(window=False):
    """A consistent copy of every counter, as plain dicts and ints;
    window: also start a new window for the largest latencies."""
    with _lock:
        try:
            return _snapshot()
        finally:
            if window:
                download.win_max_ns = pread.win_max_ns = 0


def _snapshot():
    return {
        "download": {k: getattr(download, k) for k in _Io.__slots__},
        "pread": {k: getattr(pread, k) for k in _Io.__slots__},
        "registries": {h: {k: getattr(r, k) for k in _Registry.__slots__}
                       for h, r in registries.items()},
        "fetch_reads": fetch_reads,
        "crc_healed": crc_healed,
    }
