"""Lazy remote images against a local registry: time to ready vs a full
pull, bytes fetched to read a file vs the image's blob bytes, and warm-cache
reads vs the same layers opened from local files.

Setup (all through the project's API): N ZFile+tar layers (as real
converted images are: RWLayer writes, committed as overlaybd-commit -z -t
does) on top of the bundled ext4_64 base layer (64 GiB virtual disk).  Each
layer writes 32-96 MiB of semi-compressible data (~1.7x with lz4) in
4 KiB..1 MiB extents (log-uniform) at random places over the whole disk, so
each blob is ~19-56 MiB.  Two planted "files" live in a 64 MiB region kept
free of random writes: a 1 MiB extent written by the top layer, and a 4 MiB
range in which every layer writes a slice (the top-most visible slice comes
from each of the N layers).  Everything is pushed to Debian's docker-registry
on 127.0.0.1 with tcmu_obd.remote.distribution.BlobUploader, and opened with
assemble.open_image(config.v1.json, service_config.load(overlaybd.json)), whose
repoBlobUrl + lowers [{digest, size}] point at the registry.

1. time to ready: open_image with a fresh, empty cacheDir each trial, vs
   GETting every blob completely with requests (the "pull" baseline), for
   the 3-, 6- and 10-layer images (the 3- and 6-layer images are the bottom
   layers of the 10-layer one) and a 10-layer image with twice the data;
2. bytes fetched to read a file (growth of the cache dir's allocated bytes,
   and bytes on the wire counted by a small proxy), fresh cache per row, vs
   the bytes a pull downloads;
2b. open_image and one cold 4 MiB read over all layers through a proxy (in
   its own process) that adds 0, 20 and 50 ms to every GET: how many round
   trips lie on each critical path;
3. warm-cache random 4 KiB and 128 KiB reads through the remote image vs
   the same layer files opened locally (open_layer + Image).
"""
import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import requests

from _common import (GiB, KiB, MiB, TempDir, best, env_line, fmt, interleaved, ratio, semi_compressible, spread,
                     table, warm)
from tcmu_obd.image import assemble, baselayer, commit
from tcmu_obd import service_config
from tcmu_obd.image.output import Output
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.remote.distribution import BlobUploader
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings
from tcmu_obd.image.rw import RWLayer

REPO = "obd/bench-remote"
ALIGN = 4 * KiB
PLANT = 32 * GiB                 # the region kept free of random writes
PLANT_LEN = 64 * MiB
FILE_OFF = PLANT + 4 * MiB       # 1 MiB file written by the top layer
FILE_LEN = 1 * MiB
SPAN_OFF = PLANT + 32 * MiB      # 4 MiB range every layer writes a slice of
SPAN_LEN = 4 * MiB
REFILL = 262144


# ------------------------------------------------------------------ registry
# the tests' docker-registry starter (127.0.0.1, temp dir, killed on exit)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from registry_server import Registry  # noqa: E402


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128        # 11 layers connect at once; the default backlog (5) drops SYNs


class CountingProxy:
    """HTTP proxy on 127.0.0.1 in front of the registry that counts, per
    request, the body bytes the registry sent back (what crossed the wire to
    the client), and records when each request was in flight.  `delay`
    seconds are slept before forwarding each GET (network latency, when the
    proxy runs in its own process: see DelayProxy).  POST /_log answers the
    recorded [start, end, blob digest] of each GET as JSON and forgets them.

    memory=True: a blob range GET (`Range: bytes=a-b`) is answered from a
    copy of the whole blob the proxy GETs from the registry once, on the
    blob's first range GET (the registry's headers and bytes, as a 206).
    Debian's docker-registry spends ~6 ms of CPU per range GET here, about
    the same for 4 KiB and 4 MiB; on 2 cores it would take the CPU the client
    under test needs, and a far registry's CPU is not the client's."""

    def __init__(self, upstream, delay=0.0, memory=False):
        self.up = urlsplit(upstream)
        self.memory = memory
        self.blobs = {}            # path -> (size, headers, bytes) with memory=True
        self.lock = threading.Lock()
        self.gets = 0
        self.probes = 0
        self.body_bytes = 0
        self.spans = []            # (start, end, blob) of each GET, perf_counter seconds
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                t0 = time.perf_counter()
                if delay:
                    time.sleep(delay)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "content-length")}
                if proxy.memory and self._from_memory(t0, headers):
                    return
                # one upstream keep-alive connection per client connection
                conn = getattr(self, "upstream", None)
                if conn is None:
                    conn = self.upstream = http.client.HTTPConnection(proxy.up.hostname, proxy.up.port,
                                                                      timeout=30)
                try:
                    conn.request("GET", self.path, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read()
                    hdrs = resp.getheaders()
                except BaseException:
                    conn.close()
                    self.upstream = None
                    raise
                with proxy.lock:
                    proxy.spans.append((t0, time.perf_counter(), self.path.rsplit("/", 1)[-1]))
                    proxy.gets += 1
                    proxy.probes += self.headers.get("Range") == "bytes=0-0"
                    proxy.body_bytes += len(body)
                self.send_response(resp.status)
                for k, v in hdrs:
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _from_memory(self, t0, headers):
                """Answer a blob range GET from the proxy's copy of the blob; False: not one."""
                rng = headers.get("Range", "")
                if "/blobs/sha256:" not in self.path or not rng.startswith("bytes=") or "," in rng:
                    return False
                with proxy.lock:
                    blob = proxy.blobs.get(self.path)
                if blob is None:
                    conn = http.client.HTTPConnection(proxy.up.hostname, proxy.up.port, timeout=60)
                    try:
                        conn.request("GET", self.path, headers={k: v for k, v in headers.items()
                                                                 if k.lower() != "range"})
                        resp = conn.getresponse()
                        body = resp.read()
                        if resp.status != 200:
                            return False
                        keep = [(k, v) for k, v in resp.getheaders()
                                if k.lower() not in ("connection", "keep-alive", "transfer-encoding",
                                                     "content-length", "date")]
                    finally:
                        conn.close()
                    blob = (len(body), keep, body)
                    with proxy.lock:
                        proxy.blobs[self.path] = blob
                size, keep, body = blob
                lo, _, hi = rng[len("bytes="):].partition("-")
                if not lo.isdigit() or not (hi.isdigit() or hi == "") or int(lo) >= size:
                    return False
                lo, hi = int(lo), min(size - 1, int(hi) if hi else size - 1)
                if hi < lo:
                    return False
                part = memoryview(body)[lo:hi + 1]
                with proxy.lock:
                    proxy.spans.append((t0, time.perf_counter(), self.path.rsplit("/", 1)[-1]))
                    proxy.gets += 1
                    proxy.probes += rng == "bytes=0-0"
                    proxy.body_bytes += len(part)
                self.send_response(206)
                for k, v in keep:
                    self.send_header(k, v)
                self.send_header("Content-Range", f"bytes {lo}-{hi}/{size}")
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                self.wfile.write(part)
                return True

            def finish(self):
                super().finish()
                if getattr(self, "upstream", None) is not None:
                    self.upstream.close()

            def do_POST(self):
                with proxy.lock:
                    body = json.dumps(proxy.spans).encode()
                    proxy.spans = []
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def snapshot(self):
        with self.lock:
            return self.gets, self.body_bytes, self.probes, len(self.spans)

    def max_in_flight(self, first):
        """Most GETs in flight at once among the GETs recorded since index `first`."""
        with self.lock:
            spans = self.spans[first:]
        return max_in_flight(spans)


def max_in_flight(spans):
    """Most of the (start, end, ...) intervals that overlap at one time."""
    events = sorted([(s[0], 1) for s in spans] + [(s[1], -1) for s in spans])
    peak = cur = 0
    for _t, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


class DelayProxy:
    """A CountingProxy with `delay_ms` of latency per GET, run in a process
    of its own (this script with --serve-proxy) so that its threads do not
    share the GIL with the client under test; killed and waited for on exit."""

    def __init__(self, upstream, delay_ms, memory=False):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-proxy", upstream,
                                      str(delay_ms)] + (["memory"] if memory else []),
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        try:
            line = self.proc.stdout.readline().strip()
            if not line.startswith("http://"):
                raise SystemExit(f"bench_remote: the delay proxy did not start ({line!r})")
            self.url = line
        except BaseException:
            self.__exit__()
            raise

    def log(self):
        """[(start, end, blob)] of the GETs since the last call (proxy clock)."""
        return [tuple(x) for x in requests.post(self.url + "/_log", timeout=10).json()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


def serve_proxy(upstream, delay_ms, memory=False):
    parent = os.getppid()
    with CountingProxy(upstream, delay_ms / 1e3, memory) as proxy:
        print(proxy.url, flush=True)
        while os.getppid() == parent:     # also ends if the benchmark dies without killing it
            time.sleep(0.5)


# ------------------------------------------------------------------ layers
def commit_layer(upper, out_path):
    """Commit an open RWLayer as `overlaybd-commit -z -t` does (ZFile lz4
    4 KiB blocks, tar wrapper), as tests/conftest.py commit_layer."""
    files = [upper.backing]
    header = commit.layer_info(files)
    out = Output(out_path, True, True, True, 1, 4096, 1, overwrite_header=True)
    try:
        commit.compact(upper.index.records(), files, out, header)
        out.close()
    finally:
        out.abort()
    return out_path


def random_extents(rng, vsize, total):
    """(offset, length) writes of 4 KiB..1 MiB (log-uniform) totalling
    `total` bytes, uniform over the disk but outside the planted region."""
    out, written = [], 0
    while written < total:
        ln = min(total - written, max(ALIGN, int(ALIGN * 2 ** rng.uniform(0, 8)) // ALIGN * ALIGN))
        off = rng.randrange(64 * MiB, vsize - ln, ALIGN)
        if off + ln > PLANT and off < PLANT + PLANT_LEN:
            continue
        out.append((off, ln))
        written += ln
    return out


def build_layers(tmp, n, raw_mib, rng, pool, vsize, each=None):
    """n committed ZFile+tar layer files; returns (paths, planted {key: (offset, bytes)}).
    each(path), if given, is called as soon as a layer is committed."""
    paths, planted = [], {}
    stride = SPAN_LEN // n // ALIGN * ALIGN
    for li in range(n):
        d, i = os.path.join(tmp, f"rw{li}.data"), os.path.join(tmp, f"rw{li}.index")
        up = RWLayer.create(d, i, vsize)
        try:
            def put(off, ln):
                src = rng.randrange(0, len(pool) - ln, ALIGN)
                piece = pool[src:src + ln]
                up.write(piece, off)
                return piece
            for off, ln in random_extents(rng, vsize, raw_mib[li] * MiB):
                put(off, ln)
            # this layer's slice of the 4 MiB range (the upper layer covers the overlap)
            s_off = SPAN_OFF + li * stride
            s_len = SPAN_LEN - li * stride if li == n - 1 else stride + 128 * KiB
            planted[("span", li)] = (s_off, bytes(put(s_off, s_len)))
            if li == n - 1:
                planted["file"] = (FILE_OFF, bytes(put(FILE_OFF, FILE_LEN)))
            paths.append(commit_layer(up, os.path.join(tmp, f"layer{li}.tar")))
        finally:
            up.close()
            for p in (d, i):
                os.unlink(p)
        if each is not None:
            each(paths[-1])
    return paths, planted


def upload(client, reg_url, path):
    up = BlobUploader(client, f"{reg_url}/v2/{REPO}/blobs/uploads/", chunk_size=16 * MiB)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(16 * MiB)
            if not chunk:
                break
            sha.update(chunk)
            up.write(chunk)
    digest = up.close()
    assert digest == "sha256:" + sha.hexdigest(), (digest, path)
    return {"digest": digest, "size": os.path.getsize(path)}


# ------------------------------------------------------------------ configs
def write_configs(dirpath, base_url, lowers, cache_dir):
    """overlaybd.json (file cache in cache_dir, tcmuObd timeouts) and
    config.v1.json; returns (config path, loaded service config)."""
    os.makedirs(dirpath, exist_ok=True)
    svc = os.path.join(dirpath, "overlaybd.json")
    with open(svc, "w") as f:
        json.dump({"cacheConfig": {"cacheType": "file", "cacheDir": cache_dir, "cacheSizeGB": 8,
                                   "refillSize": REFILL},
                   "credentialConfig": {"mode": "file", "path": os.path.join(dirpath, "cred.json")},
                   "tcmuObd": {"registryTimeoutSec": 10, "registryRetries": 2, "readDeadlineSec": 30}}, f)
    cfg = os.path.join(dirpath, "config.v1.json")
    with open(cfg, "w") as f:
        json.dump({"repoBlobUrl": f"{base_url}/v2/{REPO}/blobs", "lowers": lowers,
                   "resultFile": os.path.join(dirpath, "result")}, f)
    return cfg, service_config.load(svc)


def allocated(dirpath):
    """Bytes allocated on disk by the files of a directory (st_blocks)."""
    try:
        names = os.listdir(dirpath)
    except FileNotFoundError:
        return 0
    return sum(os.stat(os.path.join(dirpath, n)).st_blocks * 512 for n in names)


class Opened:
    """open_image on a fresh cache dir; closes the image and its remote
    context and removes the cache on exit."""

    def __init__(self, tmp, tag, base_url, lowers):
        self.cache = os.path.join(tmp, f"cache-{tag}")
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cfg, self.svc = write_configs(os.path.join(tmp, f"cfg-{tag}"), base_url, lowers, self.cache)
        self.image = None

    def open(self):
        t0 = time.perf_counter()
        self.image = assemble.open_image(self.cfg, self.svc)
        return time.perf_counter() - t0

    def close(self):
        if self.image is not None:
            self.image.close()
            self.image.remote.close()
            self.image = None
        shutil.rmtree(self.cache, ignore_errors=True)

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------ 1. time to ready
def pull(base_url, lowers, threads):
    """GET every blob completely (docker pull's download step, without
    writing or extracting); `threads` blobs at a time; checks the sizes."""
    url = f"{base_url}/v2/{REPO}/blobs/"
    local = threading.local()
    sessions = []

    def one(low):
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = requests.Session()
            sessions.append(s)
        n = 0
        with s.get(url + low["digest"], stream=True, timeout=30) as r:
            r.raise_for_status()
            for chunk in r.iter_content(1 * MiB):
                n += len(chunk)
        if n != low["size"]:
            raise SystemExit(f"bench_remote: pulled {n} bytes of {low['digest']}, expected {low['size']}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, lowers))
    t = time.perf_counter() - t0
    for s in sessions:
        s.close()
    return t


def get_latency(base_url, low, n=30):
    """Median ms of a 1-byte ranged GET of a blob on a keep-alive session."""
    ts = []
    with requests.Session() as s:
        for _ in range(n + 1):
            t0 = time.perf_counter()
            r = s.get(f"{base_url}/v2/{REPO}/blobs/{low['digest']}", headers={"Range": "bytes=0-0"}, timeout=10)
            r.content  # noqa: B018
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:]) * 1e3


def proc_cpu(pid):
    """CPU seconds (user + system) a process has used so far (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_to_ready(tmp, reg, images, rounds, pull_threads, goal_s):
    """images: [(label, number of layers, lowers)], the first is the reference."""
    fetched, cpu = {}, {}

    def open_trial(label, lowers):
        o = Opened(tmp, "ttr", reg.url, lowers)
        try:
            c0, r0 = time.process_time(), proc_cpu(reg.proc.pid)
            t = o.open()
            cpu.setdefault(label, []).append((time.process_time() - c0, proc_cpu(reg.proc.pid) - r0))
            with open(os.path.join(tmp, "cfg-ttr", "result")) as f:
                if f.read() != "success":
                    raise SystemExit("bench_remote: open_image did not write success")
            fetched.setdefault(label, []).append(allocated(o.cache))
            return t
        finally:
            o.close()

    cases = []
    for label, _n, lowers in images:
        cases.append((f"pull {label}", lambda lowers=lowers: pull(reg.url, lowers, pull_threads)))
        cases.append((f"open {label}", lambda label=label, lowers=lowers: open_trial(label, lowers)))
    for _name, fn in cases:          # warm-up: registry blob descriptors, page cache, imports
        fn()
    fetched.clear()
    cpu.clear()
    t = interleaved(cases, rounds)

    rows = []
    for label, n, lowers in images:
        total = sum(low["size"] for low in lowers)
        tp, to = t[f"pull {label}"], t[f"open {label}"]
        r_best, r_med = ratio(tp, to)
        f_open = statistics.median(fetched[label])
        ok = best(to) < goal_s
        rows.append([label, f"{total / MiB:,.0f}", f"{best(tp) * 1e3:.0f}", f"{spread(tp):.0f}%",
                     f"{total / best(tp) / 1e6:,.0f}", f"{best(to) * 1e3:.1f}", f"{spread(to):.0f}%",
                     f"{r_best:.1f}", f"{r_med:.1f}", f"{f_open / KiB:,.0f}", f"{total / f_open:.0f}",
                     f"< {goal_s} s" + (" ok" if ok else " MISS")])
    lat = get_latency(reg.url, images[0][2][-1])
    table("bench_remote: time to ready, lazy open_image vs full pull (local registry, cold cache)",
          ["image", "blob MiB", "pull ms", "spread", "pull MB/s", "open ms", "spread", "ratio", "ratio med",
           "fetched at open KiB", "bytes ratio", "goal (open)"], rows,
          [f"pull = GET every blob completely with requests ({pull_threads} at a time, as docker's "
           "default max-concurrent-downloads), body discarded: a lower bound on a real pull, which also "
           "writes, hashes and unpacks; on loopback it runs at the MB/s shown",
           "open = assemble.open_image(config.v1.json, service_config.load(overlaybd.json)) with a fresh, "
           "empty cacheDir each trial (new RemoteContext: new connections, resolve probes, headers, "
           "jump tables and LSMT indexes fetched); ends when resultFile says success",
           f"ratio = best pull time / best open time over {rounds} interleaved rounds (above 1: open is "
           "faster); ratio med = median of per-round ratios; spread = (max-min)/min",
           "fetched at open = cache dir allocated bytes after open (median); bytes ratio = blob bytes / "
           "fetched at open: what the time ratio tends to on a link slower than loopback",
           f"one 1-byte ranged GET to this registry on a keep-alive connection takes {lat:.2f} ms "
           "(median of 30): open costs a few GETs per layer, run 32 layers at a time on 2 cores",
           "the 3- and 6-layer images are the bottom layers of the 10-layer one; the 2x image has 10 "
           "other layers with twice the data each; all on the bundled ext4_64 base"])

    ref_label, ref_n, ref_low = images[0]
    ref_total = sum(low["size"] for low in ref_low)
    srows = []
    for label, n, lowers in images:
        total = sum(low["size"] for low in lowers)
        c_cli = sum(c for c, _ in cpu[label]) / len(cpu[label])
        c_reg = sum(r for _, r in cpu[label]) / len(cpu[label])
        srows.append([label, f"{n / ref_n:.2f}x", f"{total / ref_total:.2f}x",
                      f"{best(t[f'pull {label}']) / best(t[f'pull {ref_label}']):.2f}x",
                      f"{best(t[f'open {label}']) / best(t[f'open {ref_label}']):.2f}x",
                      f"{statistics.median(fetched[label]) / statistics.median(fetched[ref_label]):.2f}x",
                      f"{c_cli * 1e3:.0f}", f"{c_reg * 1e3:.0f}"])
    table(f"bench_remote: growth with image size, relative to the {ref_label} image",
          ["image", "layers", "blob bytes", "pull time", "open time", "fetched at open",
           "open CPU ms: this process", "registry"], srows,
          ["flat means: open time follows the number of layers (headers, jump tables and indexes, "
           "fetched in parallel), not the blob bytes; compare the 10-layer and 10-layer-2x rows "
           "(same layer count, twice the bytes); pull time follows the bytes",
           "open CPU = mean CPU time per open of this process (all threads) and of the docker-registry "
           "process (/proc, 10 ms ticks): with 2 cores, their sum bounds how fast the parallel opens can go",
           env_line()])
    return t


# ------------------------------------------------------------------ 2. bytes fetched
def bytes_fetched(tmp, reg, lowers, local, planted, rng, data_offsets):
    total = sum(low["size"] for low in lowers)
    n_layers = len(lowers) - 1
    file_off, file_data = planted["file"]
    span_want = local.read(SPAN_OFF, SPAN_LEN)
    small = rng.sample(data_offsets, 64)
    rows_spec = [
        ("open only (headers, indexes)", []),
        ("1 MiB file in the top layer", [(file_off, FILE_LEN)]),
        (f"4 MiB range over all {n_layers} layers", [(SPAN_OFF, SPAN_LEN)]),
        ("64 random 4 KiB reads of layer data", [(o, 4 * KiB) for o in small]),
    ]
    rows = []
    with CountingProxy(reg.url) as proxy:
        for ri, (name, reads) in enumerate(rows_spec):
            # pass 1, straight to the registry: cache growth and cold / warm read times
            with Opened(tmp, f"bf{ri}", reg.url, lowers) as o:
                img = o.image
                a0 = 0 if not reads else allocated(o.cache)
                t0 = time.perf_counter()
                got = [img.read(off, ln) for off, ln in reads]
                cold = time.perf_counter() - t0
                fetched = allocated(o.cache) - a0
                t0 = time.perf_counter()
                for off, ln in reads:
                    img.read(off, ln)
                warm_t = time.perf_counter() - t0
                touched = set()
                for (off, ln), g in zip(reads, got):
                    if g != local.read(off, ln):
                        raise SystemExit(f"bench_remote: remote read {off}+{ln} differs from the local layers")
                    touched |= {r[4] for r in img.effective_records(off // 512, ln // 512) if not r[3]}
                if ri == 1 and got[0] != file_data:
                    raise SystemExit("bench_remote: the planted file does not read back")
                if ri == 2 and got[0] != span_want:
                    raise SystemExit("bench_remote: the spanning range does not read back")
            # pass 2, through the counting proxy: bytes on the wire and requests
            g0, b0, p0, s0 = proxy.snapshot()
            with Opened(tmp, f"bp{ri}", proxy.url, lowers) as o:
                if reads:
                    g0, b0, p0, s0 = proxy.snapshot()
                for off, ln in reads:
                    o.image.read(off, ln)
                g1, b1, p1, _s1 = proxy.snapshot()
            inflight = proxy.max_in_flight(s0)
            nread = sum(ln for _off, ln in reads)
            gets = f"{g1 - g0}" + (f" ({p1 - p0} probes)" if p1 - p0 else "")
            rows.append([name, f"{nread / KiB:,.0f}" if nread else "-", str(len(touched)) if reads else "-",
                         f"{fetched / KiB:,.0f}", f"{(b1 - b0) / KiB:,.0f}", gets,
                         f"{fetched / nread:.1f}x" if nread else "-", f"{100 * fetched / total:.3f}%",
                         f"{total / fetched:,.0f}", str(inflight), f"{cold * 1e3:.1f}" if reads else "-",
                         f"{warm_t * 1e3:.2f}" if reads else "-"])
    table("bench_remote: bytes fetched to read, fresh cache per row, vs a full pull",
          ["read", "KiB read", "layers", "fetched KiB", "wire KiB", "GETs", "fetched/read", "of pull", "ratio",
           "max in flight", "cold ms", "warm ms"], rows,
          [f"image: {n_layers} ZFile+tar layers + ext4_64 base, {total / MiB:,.1f} MiB of blobs (= the pull "
           "baseline's bytes); each row opens the image on a new empty cacheDir (twice: straight to the "
           "registry for fetched and times, then through a counting proxy for wire bytes and GETs)",
           "fetched = growth of the cache dir's allocated bytes during the reads (the open row: after open); "
           "wire = body bytes the registry sent; probes = 1-byte GETs that resolve a blob and learn its size",
           "ratio = pull bytes / fetched bytes (above 1: fewer bytes than a pull); the cache fills whole "
           f"refillSize units ({REFILL // KiB} KiB), so a 4 KiB read fetches up to {REFILL // KiB} KiB "
           "(overlaybd's design too)",
           "layers = distinct layers the range's visible data comes from; max in flight = most GETs the proxy "
           "had in progress at once (the open row: across layers opened in parallel; a read row: 1 means "
           "its GETs ran one after another)",
           "cold ms = the reads right after open (fetches included), warm ms = the same reads again; every "
           "read compared with the local layers"])


# ------------------------------------------------------------------ 2b. latency
def with_latency(tmp, reg, lowers, delays_ms, trials, goal_s):
    """open_image and one cold 4 MiB read over all layers through a proxy (own
    process) that adds a fixed delay to every GET; +0 ms is the baseline."""
    res = {}
    for d in [0] + delays_ms:
        with DelayProxy(reg.url, d) as px:
            opens, reads, chains, flights, read_gets = [], [], [], [], []
            for trial in range(trials + 1):        # trial 0 warms up (imports, registry, proxy)
                o = Opened(tmp, "lat", px.url, lowers)
                try:
                    px.log()
                    t_open = o.open()
                    log = px.log()
                    t0 = time.perf_counter()
                    got = o.image.read(SPAN_OFF, SPAN_LEN)
                    t_read = time.perf_counter() - t0
                    rlog = px.log()
                finally:
                    o.close()
                if trial == 0:
                    if got != res.get("want", got):
                        raise SystemExit("bench_remote: the 4 MiB range read differently through the proxy")
                    res["want"] = got
                    continue
                per_blob = {}
                for _a, _b, blob in log:
                    per_blob[blob] = per_blob.get(blob, 0) + 1
                opens.append(t_open)
                reads.append(t_read)
                chains.append(max(per_blob.values()))
                flights.append(max_in_flight(log))
                read_gets.append((len(rlog), max_in_flight(rlog)))
            res[d] = (opens, reads, max(chains), max(flights), read_gets[0])
    rows = []
    o0, r0 = best(res[0][0]), best(res[0][1])
    for d in [0] + delays_ms:
        opens, reads, chain, flight, (rg, rflight) = res[d]
        ob, rb = best(opens), best(reads)
        rows.append([f"+{d} ms" + (" (base)" if d == 0 else ""), f"{ob * 1e3:.0f}",
                     "-" if d == 0 else f"{(ob - o0) * 1e3:+.0f}", str(chain), str(flight), f"{rb * 1e3:.0f}",
                     "-" if d == 0 else f"{(rb - r0) * 1e3 / d:.1f}", f"{rg} ({rflight} at once)",
                     f"< {goal_s} s" + (" ok" if ob < goal_s else " MISS")])
    n_layers = len(lowers) - 1
    table("bench_remote: time to ready and a cold read with network latency added to every GET",
          ["latency per GET", "open ms", "vs +0", "GETs per blob, max", "blobs at once",
           f"cold 4 MiB read over {n_layers} layers ms", "read: GETs in series", "read GETs", "goal (open)"], rows,
          ["a proxy in its own process sleeps the given time before forwarding each GET to the registry "
           "(a round trip of that length; no bandwidth limit); the +0 ms row goes through the same proxy, "
           "whose own CPU adds to the open's (all 11 blobs at once on 2 cores)",
           f"open = open_image of the {n_layers}-layer image on an empty cacheDir; cold read = one 4 MiB read "
           "whose visible data comes from all the layers, right after open; best of "
           f"{trials} trials each",
           "read: GETs in series = (read time - read time at +0 ms) / latency: round trips on the read's "
           "critical path (the ratio to the +0 ms baseline); GETs per blob = requests the open sends for one "
           "blob, one after another (the open's critical path is at least that many round trips; the rest "
           "overlaps with CPU work, so the open's own time difference is shown, not divided); blobs at once "
           "= most GETs in flight together",
           env_line()])


# ------------------------------------------------------------------ 3. cached reads
def loop_into(read_into, size, offs):
    buf = bytearray(size)
    t0 = time.perf_counter()
    for off in offs:
        read_into(buf, off)
    return time.perf_counter() - t0


def cached_reads(tmp, reg, lowers, local, paths, rng, data_offsets, ops4k, ops128k, rounds):
    rows, notes = [], []
    with Opened(tmp, "warm", reg.url, lowers) as o:
        img = o.image
        for p in paths:
            warm(p)
        t0 = time.perf_counter()
        for layer in img.lowers:        # fill the cache: each blob's CachedBlob fetches all it lacks
            layer.owner.ensure(0, layer.owner.size)
        t_fill = time.perf_counter() - t0
        for size, nops in ((4 * KiB, ops4k), (128 * KiB, ops128k)):
            offs = [min(rng.choice(data_offsets), img.virtual_size - size) for _ in range(nops)]
            # read every timed offset through both once, and compare
            b1, b2 = bytearray(size), bytearray(size)
            for off in offs:
                img.read_into(b1, off)
                local.read_into(b2, off)
                if b1 != b2:
                    raise SystemExit(f"bench_remote: remote read {off}+{size} differs from the local layers")
            for name in os.listdir(o.cache):
                warm(os.path.join(o.cache, name))
            used0 = img.remote.cache.used
            cases = [("local layers Stack.read_into", lambda: loop_into(local.stack.read_into, size, offs)),
                     ("remote, cache warm Stack.read_into", lambda: loop_into(img.stack.read_into, size, offs))]
            t = interleaved(cases, rounds)
            grew = img.remote.cache.used - used0
            base = t[cases[0][0]]
            for name, _ in cases:
                tb = best(t[name])
                is_base = name.startswith("local")
                r_best, r_med = ratio(base, t[name])
                g = "" if is_base else ">= 0.9" + (" ok" if r_best >= 0.9 else " MISS")
                rows.append([name, f"{size // KiB} KiB", fmt(nops * size / tb / 1e6), fmt(nops / tb / 1e3),
                             f"{tb / nops * 1e6:.2f}", "1.00 (base)" if is_base else f"{r_best:.2f}",
                             "" if is_base else f"{r_med:.2f}", f"{spread(t[name]):.0f}%", g])
            recs = sum(len(img.effective_records(x // 512, size // 512)) for x in offs[:2000]) / min(2000, nops)
            notes.append(f"{size // KiB} KiB: {nops} reads per trial, {recs:.2f} merged records per read on "
                         f"average; {grew} bytes fetched during the timed rounds (FileCache.used; 0 = every read hit)")
        cache_bytes = allocated(o.cache)
    table("bench_remote: random reads with the cache warm, remote image vs the same layers opened locally",
          ["case", "size", "MB/s", "kops/s", "us/op", "ratio", "ratio med", "spread", "goal"], rows,
          ["offsets: 4 KiB-aligned, uniform over the bytes the layers wrote (not the 64 GiB of mostly holes); "
           "every timed offset was first read through both and compared",
           f"cache filled after open by CachedBlob.ensure(0, size) of every layer (one ranged GET per blob, "
           f"{t_fill:.1f}s), as a finished background download would leave it",
           "local = open_layer() of the same committed layer files + Image (page cache warm); remote = "
           "open_image from the registry, served from the file cache (page cache warm)",
           f"ratio = best local time / best remote time over {rounds} interleaved rounds; above 1: remote faster",
           *notes,
           f"cache dir holds {cache_bytes / MiB:,.1f} MiB", env_line()])


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--sizes", default="3,6", help="smaller images (bottom layers) also timed in table 1")
    ap.add_argument("--min-mib", type=int, default=32, help="raw data per layer, low end (blob ~0.6x)")
    ap.add_argument("--max-mib", type=int, default=96, help="raw data per layer, high end")
    ap.add_argument("--rounds", type=int, default=5, help="rounds for table 1")
    ap.add_argument("--read-rounds", type=int, default=20, help="rounds for table 3")
    ap.add_argument("--ops4k", type=int, default=20_000)
    ap.add_argument("--ops128k", type=int, default=3_000)
    ap.add_argument("--big", type=float, default=2.0,
                    help="also time an image of --layers layers with this many times the data (0: skip)")
    ap.add_argument("--latency-ms", default="20,50",
                    help="per-GET latencies for the latency table, ms, comma-separated ('' skips it)")
    ap.add_argument("--latency-trials", type=int, default=3)
    ap.add_argument("--pull-threads", type=int, default=3)
    ap.add_argument("--goal", type=float, default=0.5, help="time-to-ready goal, seconds")
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    counts = sorted({int(x) for x in a.sizes.split(",") if x} | {a.layers})
    delays = [int(x) for x in a.latency_ms.split(",") if x]
    if counts[0] < 1 or counts[-1] > a.layers:
        raise SystemExit("--sizes must be between 1 and --layers")

    with TempDir("remote") as tmp:
        t0 = time.perf_counter()
        pool = memoryview(semi_compressible(64 * MiB, seed=a.seed))
        with open_layer(baselayer.path()) as base:
            vsize = base.virtual_size
        raw = [rng.randrange(a.min_mib, a.max_mib + 1) for _ in range(a.layers)]
        paths, planted = build_layers(tmp, a.layers, raw, rng, pool, vsize)
        files = [baselayer.path()] + paths
        t_build = time.perf_counter() - t0
        os.makedirs(os.path.join(tmp, "registry"))
        with Registry() as reg:
            t0 = time.perf_counter()
            client = RegistryClient(RegistrySettings())
            try:
                lowers = [upload(client, reg.url, p) for p in files]
                big_lowers = None
                if a.big > 1:                 # the same number of layers with `big` times the data
                    big_dir = os.path.join(tmp, "big")
                    os.makedirs(big_dir)
                    big_lowers = lowers[:1]

                    def push_and_drop(path):  # only the registry copy is used
                        big_lowers.append(upload(client, reg.url, path))
                        os.unlink(path)
                    build_layers(big_dir, a.layers, [int(r * a.big) for r in raw], random.Random(a.seed + 1),
                                 pool, vsize, each=push_and_drop)
            finally:
                client.close()
            del pool
            t_push = time.perf_counter() - t0
            total = sum(low["size"] for low in lowers)
            print(f"bench_remote: {a.layers} layers of {min(raw)}-{max(raw)} MiB raw data, blobs "
                  f"{min(low['size'] for low in lowers[1:]) / MiB:.1f}-"
                  f"{max(low['size'] for low in lowers[1:]) / MiB:.1f} MiB, {total / MiB:,.1f} MiB in all "
                  f"(raw {sum(raw)} MiB); virtual size {vsize / GiB:.0f} GiB; built in {t_build:.1f}s; "
                  + (f"{a.big:g}x image {sum(low['size'] for low in big_lowers) / MiB:,.1f} MiB; "
                     if big_lowers else "")
                  + f"built (2x) and pushed in {t_push:.1f}s", flush=True)
            images = [(f"{k} layers", k, lowers[:k + 1]) for k in counts]
            if big_lowers:
                images.append((f"{a.layers} layers, {a.big:g}x data", a.layers, big_lowers))

            local = Image([open_layer(p) for p in files])
            try:
                if local.virtual_size < 5 * GiB:
                    raise SystemExit("bench_remote: virtual size below 5 GiB")
                for key, (off, data) in planted.items():
                    if key == "file" or key == ("span", a.layers - 1):
                        if local.read(off, len(data)) != data:
                            raise SystemExit(f"bench_remote: planted {key} does not read back locally")
                # 4 KiB-aligned offsets inside data the layers wrote, weighted by length
                recs = [r for r in local.effective_records() if not r[3] and r[4] < a.layers]
                weights = [r[1] for r in recs]
                data_offsets = []
                for r in rng.choices(recs, weights, k=50_000):
                    lo = -(-r[0] * 512 // ALIGN) * ALIGN
                    hi = (r[0] + r[1]) * 512 - ALIGN
                    if hi >= lo:
                        data_offsets.append(rng.randrange(lo, hi + 1, ALIGN))

                took = [("build+push", t_build + t_push)]
                steps = [("time to ready", lambda: time_to_ready(tmp, reg, images, a.rounds, a.pull_threads,
                                                                 a.goal)),
                         ("bytes fetched", lambda: bytes_fetched(tmp, reg, lowers, local, planted, rng,
                                                                 data_offsets)),
                         ("latency", lambda: with_latency(tmp, reg, lowers, delays, a.latency_trials, a.goal)
                          if delays else None),
                         ("cached reads", lambda: cached_reads(tmp, reg, lowers, local, files, rng, data_offsets,
                                                               a.ops4k, a.ops128k, a.read_rounds))]
                for name, step in steps:
                    t0 = time.perf_counter()
                    step()
                    took.append((name, time.perf_counter() - t0))
                print("\nbench_remote: " + ", ".join(f"{n} {t:.1f}s" for n, t in took), flush=True)
            finally:
                local.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-proxy"]:          # DelayProxy's child process
        serve_proxy(sys.argv[2], float(sys.argv[3]), sys.argv[4:5] == ["memory"])
    else:
        main()
