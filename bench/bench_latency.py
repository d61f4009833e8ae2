"""Cold reads from a far registry: a registry on 127.0.0.1 behind a proxy
(bench_remote's DelayProxy, in a process of its own) that adds 0, 10 or
50 ms to every GET, and an image converted by `tcmu-obd convert` from a
one-layer OCI image holding a 128 MiB file.  Each trial mounts the image
with run.RunningImage (FUSE + loop, or TCMU where the kernel has it) on a
fresh, empty cache and measures:

- a cold sequential read of the whole file (1 MiB read() calls), MB/s;
- cold random 4 KiB reads of the file's blocks at queue depth 1 and 32
  (threads), IOPS, through the Image (assemble.open_image, the path of a
  TCMU read); through FUSE + loop the loop device serializes the reads, so
  the mount would measure the frontend, not the cache;
- with --cli, the time of `tcmu-obd run --exit --cat FILE` at the largest
  latency (the command with the default overlaybd.json).

Every figure is also given as a ratio to the same reads at +0 ms, measured in
this run; a row with `readAheadBytes: 0` shows what read-ahead buys.  Goals
(issue 12): at 50 ms, sequential >= 100 MB/s and QD32 >= 20x QD1.  This is
not a test: it asserts nothing and needs root (mount), docker-registry.
"""
import argparse
import fcntl
import io
import json
import struct
import mmap
import os
import random
import subprocess
import sys
import threading
import time

from _common import MiB, ROOT, TempDir, env_line, fmt, table, write_tar
from bench_remote import DelayProxy, Registry, max_in_flight
from tcmu_obd import service_config
from tcmu_obd.build import run
from tcmu_obd.image import assemble
from tcmu_obd.remote import imageref
from dataclasses import replace

SRC, DST = "bench/latency-src", "bench/latency"
FILE = "data/big.bin"


def push_source(reg, size):
    """A one-layer OCI image (uncompressed tar) with FILE of `size` random bytes."""
    import hashlib
    import json
    import requests
    buf = io.BytesIO()
    write_tar(buf, [(FILE, random.Random(7).randbytes(size))])
    layer = buf.getvalue()
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers",
                                 "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode()
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": reg.push_blob(SRC, cfg), "size": len(cfg)},
         "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": reg.push_blob(SRC, layer), "size": len(layer)}]}
    r = requests.put(f"{reg.url}/v2/{SRC}/manifests/v1", data=json.dumps(m).encode(),
                     headers={"Content-Type": m["mediaType"]}, timeout=60)
    r.raise_for_status()


def svc_for(readahead):
    return service_config.from_dict({"tcmuObd": {"readAheadBytes": readahead}}, "<bench>")


def sequential(path):
    """MB/s of a cold read of the file; and the disk offset of each of its 4 KiB blocks (FIBMAP)."""
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(MiB)
            if not b:
                break
            n += len(b)
        mbps = n / (time.perf_counter() - t0) / 1e6
        blocks = [struct.unpack("i", fcntl.ioctl(f.fileno(), 1, struct.pack("i", k)))[0] * 4096
                  for k in range(n // 4096)]
    return mbps, blocks


def open_direct(ref_text, svc, work):
    """The image as run.RunningImage opens it, without a frontend, on a fresh cache in `work`."""
    ref = imageref.parse_ref(ref_text)
    with imageref.client_from_service_config(svc) as client:
        manifest, where = imageref.fetch_image_manifest(client, ref, ["linux", "amd64"])
    cfg = os.path.join(work, "config.v1.json")
    with open(cfg, "w") as f:
        json.dump({"repoBlobUrl": ref.repo_blob_url, "lowers": imageref.overlaybd_lowers(manifest, where),
                   "upper": {}, "resultFile": os.path.join(work, "result")}, f)
    svc = replace(svc, cache_config=replace(svc.effective_cache, cache_dir=os.path.join(work, "cache")))
    return assemble.open_image(cfg, svc)


def random_reads(image, blocks, depth, per_thread, seed):
    """IOPS of 4 KiB reads of random blocks of the file, `depth` threads."""
    errors = []

    def worker(k):
        rng = random.Random(seed * 1000 + k)
        try:
            for _ in range(per_thread):
                if len(image.read(rng.choice(blocks), 4096)) != 4096:
                    raise OSError("short read")
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(depth)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return depth * per_thread / dt


def measure(proxy, readahead, qd1_reads, qd32_reads, tmp):
    ref = f"{proxy.url.split('//', 1)[1]}/{DST}:v1"
    out = {}
    svc = svc_for(readahead)
    with run.RunningImage(ref, service_cfg=svc) as img:
        out["seq"], blocks = sequential(os.path.join(img.mountpoint, FILE))
    for key, depth, n, seed in (("qd1", 1, qd1_reads, 1), ("qd32", 32, max(1, qd32_reads // 32), 2)):
        with TempDir("latency-rand") as work:
            image = open_direct(ref, svc, work)
            try:
                proxy.log()
                out[key] = random_reads(image, blocks, depth, n, seed)
                spans = proxy.log()
            finally:
                image.close()
            out[key + " flight"] = max_in_flight(spans)
            out[key + " get ms"] = 1e3 * sum(e - s for s, e, _b in spans) / max(1, len(spans))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", default="10,50", help="added latencies per GET, ms (0 is always run)")
    ap.add_argument("--size-mb", type=int, default=128, help="size of the file, MiB")
    ap.add_argument("--qd1-reads", type=int, default=60)
    ap.add_argument("--qd32-reads", type=int, default=640)
    ap.add_argument("--readahead", type=int, default=32 * MiB, help="tcmuObd.readAheadBytes for the rows")
    ap.add_argument("--origin", choices=("memory", "registry"), default="memory",
                    help="memory: the proxy answers range GETs from its copy of each blob (fetched "
                         "from the registry once); registry: it forwards every GET to the registry")
    ap.add_argument("--no-cli", action="store_true", help="skip the `tcmu-obd run --exit --cat` timing")
    a = ap.parse_args()
    print(env_line())
    size = a.size_mb * MiB
    delays = [0] + [int(x) for x in a.latency_ms.split(",") if x and int(x)]
    with TempDir("latency") as tmp, Registry() as reg:
        push_source(reg, size)
        host = reg.url.split("//", 1)[1]
        subprocess.run([sys.executable, "-m", "tcmu_obd.cli.convert", "convert", f"{host}/{SRC}:v1",
                        f"{host}/{DST}:v1", "--no-reuse", "--workdir", tmp, "-q"], check=True, cwd=ROOT)
        rows, results = [], {}
        cases = [(d, a.readahead) for d in delays] + [(delays[-1], 0)]
        for delay, ra in cases:
            with DelayProxy(reg.url, delay, a.origin == "memory") as proxy:
                results[(delay, ra)] = r = measure(proxy, ra, a.qd1_reads, a.qd32_reads, tmp)
            base = results[(0, a.readahead)]
            rows.append([f"+{delay} ms", f"{ra // MiB} MiB" if ra else "off",
                         fmt(r["seq"]), fmt(r["seq"] / base["seq"], 2),
                         fmt(r["qd1"]), fmt(r["qd1"] / base["qd1"], 2),
                         fmt(r["qd32"]), fmt(r["qd32"] / base["qd32"], 2), fmt(r["qd32"] / r["qd1"], 1),
                         str(r["qd32 flight"]), fmt(r["qd1 get ms"]), fmt(r["qd32 get ms"])])
        cli_row = []
        if not a.no_cli:
            with DelayProxy(reg.url, delays[-1], a.origin == "memory") as proxy:
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "tcmu_obd.cli.convert", "run",
                                    f"{proxy.url.split('//', 1)[1]}/{DST}:v1", "--exit", "--cat", FILE],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
                dt = time.perf_counter() - t0
            cli_row = [f"`tcmu-obd run --exit --cat {FILE}` at +{delays[-1]} ms: {dt:.2f} s"
                       + (f" (exit {p.returncode}: {p.stderr.decode()[-300:]})" if p.returncode else "")]
    table(f"bench_latency: cold reads of a {a.size_mb} MiB file, fresh cache per cell",
          ["latency per GET", "read-ahead", "seq MB/s", "vs +0", "QD1 IOPS", "vs +0", "QD32 IOPS", "vs +0",
           "QD32/QD1", "QD32 GETs in flight, max", "GET ms QD1", "GET ms QD32"], rows,
          notes=[f"sequential: 1 MiB read()s of the mounted file (FUSE + loop or TCMU); random: 4 KiB "
                 f"Image.read()s of the file's blocks, {a.qd1_reads} at QD1, {a.qd32_reads} at QD32 "
                 f"(threads), each on a fresh cache",
                 f"origin: {a.origin} ("
                 + ("the proxy answers range GETs from its copy of each blob: the local registry's "
                    "CPU per GET is not charged to the client's 2 cores" if a.origin == "memory" else
                    "every GET goes to the local docker-registry: ~6 ms of its CPU per range GET")
                 + ")",
                 "GET ms: mean time the proxy took per GET (added latency included); when it grows "
                 "far past the latency at QD32, the registry and proxy, not the client, are the limit",
                 "goals at 50 ms: seq >= 100 MB/s, QD32/QD1 >= 20"] + cli_row)


if __name__ == "__main__":
    main()
