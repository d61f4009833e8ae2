"""The DADI seed's table on this machine: an OCI image (gzip'd layers) vs the
same image converted to overlaybd, in a local docker-registry.  Needs root
(FUSE, loop devices, ext4 mounts) and docker-registry.

Image: ~1 GiB (x --scale) of semi-compressible file data (~1.7x with lz4,
1 MiB files), laid out as three shapes: 1 x 1 GiB, 4 x 256 MiB and
10 x 100 MiB layers (the same files, split differently).  Each shape is
pushed as an OCI image (tar+gzip level 1 layers, plain HTTP) and converted
with tcmu_obd.build.convert (what `tcmu-obd convert SRC DST --plain-http` does:
download, gunzip, apply, commit -z -t, upload; untimed setup).

Per shape, interleaved rounds of:
  pull   OCI (baseline): GET every layer blob (3 downloads at a time, as
         docker's max-concurrent-downloads), then `tar -xzf` each layer in
         order into one fresh directory as soon as it and the ones below are
         downloaded (docker's download/extract pipeline; no sync).
         overlaybd: `tcmu-obd run`'s path (tcmu_obd.build.run.RunningImage):
         manifest -> config.v1.json (remote lowers) -> open_image on an empty
         cache dir -> FUSE + loop -> ext4 mount (ro), then a first read of one
         1 MiB file of the top layer through the mount (checked).
  build  OCI (baseline): `tar -xf` of a new 64 MiB tar into a fresh upper
         directory (what a build step writes on overlayfs), then sync.
         overlaybd: tcmu_obd.build.apply.apply_layer of the same tar onto a fresh
         RW upper over the remote image (FUSE + loop + ext4, upper fsynced).
  push   OCI (baseline): `tar -czf` (gzip -6, docker's default) of that upper
         directory, sha256, upload (POST + PUT).
         overlaybd: commit -z -t of the upper (lz4 4 KiB ZFile in tar, as
         overlaybd-commit), sha256, upload (tcmu_obd.remote.blobs.upload_file).

Ratio = overlaybd time / OCI time (below 1: overlaybd faster), best of the
rounds for each, and the median of the per-round ratios.  Bytes fetched for
the overlaybd pull (bytes its remote reads returned) are set against the
image's blob bytes.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import requests

from _common import (MiB, ROOT, TempDir, best, env_line, interleaved, semi_compressible, spread,
                     table, warm, write_tar)
from tcmu_obd.build import apply, convert, run
from tcmu_obd.remote import blobs, imageref
from tcmu_obd import service_config
from tcmu_obd.image.rw import RWLayer

SHAPES = [("1 x 1 GiB", 1, 1024), ("4 x 256 MiB", 4, 256), ("10 x 100 MiB", 10, 100)]
FILE = 1 * MiB
MTIME = 1700000000


# ------------------------------------------------------------------ data
class Data:
    """File i = 1 MiB of semi-compressible bytes (a rotation of a 64 MiB pool
    plus its own 16-byte tag, so no two files are equal)."""

    def __init__(self, seed=1):
        self.pool = bytes(semi_compressible(64 * MiB, seed=seed))

    def file(self, i):
        off = (i * 1_234_567) % (len(self.pool) - FILE)
        return f"file-{i:08d}".encode().ljust(16, b".") + self.pool[off + 16:off + FILE]


def tar_bytes(entries):
    """entries: [(name, bytes)] -> an uncompressed PAX tar, directories added."""
    buf = io.BytesIO()
    write_tar(buf, entries, MTIME)
    return buf.getvalue()


def gzip_parallel(raw, level=1, threads=2, piece=32 * MiB):
    """gzip of raw as concatenated members compressed in threads (zlib frees
    the GIL); a valid gzip stream for gunzip, tar -z and the converter."""
    parts = [raw[i:i + piece] for i in range(0, len(raw), piece)]
    with ThreadPoolExecutor(threads) as ex:
        return b"".join(ex.map(lambda p: gzip.compress(p, compresslevel=level, mtime=0), parts))


def push_blob(base, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30)
    r.raise_for_status()
    loc = r.headers["Location"]
    r = requests.put(loc + ("&" if "?" in loc else "?") + "digest=" + digest, data=data,
                     headers={"Content-Type": "application/octet-stream"}, timeout=300)
    assert r.status_code == 201, (r.status_code, r.text[:300])
    return digest


def push_oci(base, repo, layer_files, data):
    """Build, gzip and push one OCI image; returns (layer descriptors, tar bytes)."""
    descs, diff_ids, raw_total = [], [], 0
    for li, idx in enumerate(layer_files):
        raw = tar_bytes([(f"l{li}/d{i // 64}/f{i}", data.file(i)) for i in idx])
        raw_total += len(raw)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        gz = gzip_parallel(raw)
        del raw
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": push_blob(base, repo, gz), "size": len(gz)})
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": push_blob(base, repo, cfg), "size": len(cfg)},
         "layers": descs}
    r = requests.put(f"{base}/v2/{repo}/manifests/v1", data=json.dumps(m).encode(),
                     headers={"Content-Type": m["mediaType"]}, timeout=30)
    assert r.status_code == 201, r.text
    return descs, raw_total


# ------------------------------------------------------------------ trials
class Shape:
    def __init__(self, tmp, reg_url, name, nlayers, layer_mib, scale, data, svc_path):
        self.tmp, self.url, self.name, self.data = tmp, reg_url, name, data
        self.host = reg_url.split("//", 1)[1]
        self.tag = name.replace(" ", "").lower()
        self.src_repo, self.dst_repo = f"oci/{self.tag}", f"obd/{self.tag}"
        per = max(1, round(layer_mib * scale * MiB / FILE))
        self.layer_files = [range(li * per, (li + 1) * per) for li in range(nlayers)]
        self.nfiles = per * nlayers
        self.probe = (f"l{nlayers - 1}/d{(self.nfiles - 1) // 64}/f{self.nfiles - 1}", self.nfiles - 1)
        self.svc_path = svc_path
        self.n = 0

    def setup(self):
        t0 = time.perf_counter()
        self.descs, self.tar_total = push_oci(self.url, self.src_repo, self.layer_files, self.data)
        self.t_push_oci = time.perf_counter() - t0
        t0 = time.perf_counter()
        convert.convert(f"{self.host}/{self.src_repo}:v1", f"{self.host}/{self.dst_repo}:v1",
                            convert.Options(db_path="none", quiet=True, workdir=self.tmp, plain_http=True))
        self.t_convert = time.perf_counter() - t0
        self.oci_bytes = sum(d["size"] for d in self.descs)
        ref = imageref.parse_ref(f"{self.host}/{self.dst_repo}:v1", True)
        svc = service_config.load(self.svc_path)
        with imageref.client_from_service_config(svc) as client:
            manifest, _ = imageref.fetch_image_manifest(client, ref, ["linux", "amd64"])
        self.lowers = imageref.overlaybd_lowers(manifest, ref)
        self.obd_bytes = sum(low["size"] for low in self.lowers)
        self.repo_blob_url = ref.repo_blob_url
        self.fetched = []

    def fresh(self, what):
        self.n += 1
        d = os.path.join(self.tmp, f"{self.tag}-{what}{self.n}")
        os.makedirs(d)
        return d

    # -- pull
    def pull_oci(self):
        d = self.fresh("oci")
        root = os.path.join(d, "rootfs")
        os.makedirs(root)
        t0 = time.perf_counter()

        def get(i):
            path = os.path.join(d, f"blob{i}")
            with requests.get(f"{self.url}/v2/{self.src_repo}/blobs/{self.descs[i]['digest']}", stream=True,
                              timeout=60) as r, open(path, "wb") as f:
                r.raise_for_status()
                for chunk in r.iter_content(1 * MiB):
                    f.write(chunk)
            return path
        with ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(get, i) for i in range(len(self.descs))]
            for fut in futs:
                path = fut.result()
                subprocess.run(["tar", "-xzf", path, "-C", root], check=True)
                os.unlink(path)
        el = time.perf_counter() - t0
        name, i = self.probe
        with open(os.path.join(root, name), "rb") as f:
            if f.read() != self.data.file(i):
                raise SystemExit(f"bench_seed: {self.name}: OCI pull: {name} differs")
        shutil.rmtree(d)
        return el

    def pull_obd(self):
        d = self.fresh("run")
        svc = service_config.load(self.svc_path)
        t0 = time.perf_counter()
        with run.RunningImage(f"{self.host}/{self.dst_repo}:v1", plain_http=True, service_cfg=svc,
                               cache_dir=os.path.join(d, "cache")) as img:
            t_attach = time.perf_counter() - t0
            name, i = self.probe
            with open(os.path.join(img.mountpoint, name), "rb") as f:
                got = f.read()
            el = time.perf_counter() - t0
            fetched = img.fetched()
        if got != self.data.file(i):
            raise SystemExit(f"bench_seed: {self.name}: overlaybd first read of {name} differs")
        self.fetched.append((fetched, t_attach))
        shutil.rmtree(d)
        return el

    # -- build + push (the build's output is pushed in the same trial, timed apart)
    def build_push_oci(self, new_tar, out):
        d = self.fresh("ociup")
        upper = os.path.join(d, "upper")
        os.makedirs(upper)
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", new_tar, "-C", upper], check=True)
        os.sync()
        t1 = time.perf_counter()
        gz = os.path.join(d, "layer.tar.gz")
        subprocess.run(["tar", "-czf", gz, "-C", upper, "."], check=True)
        with open(gz, "rb") as f:
            push_blob(self.url, f"push/{self.tag}", f.read())
        t2 = time.perf_counter()
        out["build OCI"].append(t1 - t0)
        out["push OCI"].append(t2 - t1)
        shutil.rmtree(d)
        os.sync()

    def build_push_obd(self, new_tar, out):
        d = self.fresh("obdup")
        data, index = os.path.join(d, "data"), os.path.join(d, "index")
        RWLayer.create(data, index, 0 if self.lowers else 64 << 30).close()
        cfg = os.path.join(d, "config.v1.json")
        with open(cfg, "w") as f:
            json.dump({"repoBlobUrl": self.repo_blob_url, "lowers": self.lowers,
                       "upper": {"data": data, "index": index}, "resultFile": os.path.join(d, "result")}, f)
        svc = service_config.load(self.svc_path)
        svc_d = os.path.join(d, "cache")
        svc = replace(svc, cache_config=replace(svc.effective_cache, cache_dir=svc_d))
        t0 = time.perf_counter()
        apply.apply_layer(new_tar, cfg, service_cfg=svc, workdir=d)
        t1 = time.perf_counter()
        commit_path = os.path.join(d, "overlaybd.commit")
        conv = convert.Converter(convert.Options(quiet=True))
        conv._commit(data, index, commit_path, "", "")
        ref = imageref.parse_ref(f"{self.host}/push/{self.tag}:v1", True)
        with imageref.client_from_service_config(svc) as client:
            blobs.upload_file(client, ref, commit_path)
        t2 = time.perf_counter()
        out["build overlaybd"].append(t1 - t0)
        out["push overlaybd"].append(t2 - t1)
        shutil.rmtree(d)
        os.sync()


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="image size factor (1.0: ~1 GiB per shape)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default="1,4,10", help="layer counts of the shapes to run (1,4,10)")
    ap.add_argument("--build-mib", type=int, default=64, help="size of the tar written by the build step")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_seed: needs root (FUSE, loop devices, ext4 mounts); skipped")
        return 0
    if not shutil.which("docker-registry"):
        print("bench_seed: needs docker-registry (scripts/setup.sh installs it); skipped")
        return 0
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from registry_server import Registry
    chosen = {int(x) for x in args.shapes.split(",") if x}
    t_start = time.perf_counter()
    with TempDir("seed") as tmp, Registry() as reg:
        svc_path = os.path.join(tmp, "overlaybd.json")
        with open(svc_path, "w") as f:
            json.dump({"cacheConfig": {"cacheType": "file", "cacheDir": os.path.join(tmp, "cache"),
                                       "cacheSizeGB": 8, "refillSize": 262144},
                       "credentialConfig": {"mode": "file", "path": os.path.join(tmp, "cred.json")},
                       "tcmuObd": {"registryTimeoutSec": 30, "registryRetries": 2, "readDeadlineSec": 60}}, f)
        data = Data()
        new_tar = os.path.join(tmp, "new-layer.tar")
        with open(new_tar, "wb") as f:
            f.write(tar_bytes([(f"app/d{i // 16}/n{i}", data.file(10_000_000 + i))
                               for i in range(args.build_mib * MiB // FILE)]))
        warm(new_tar)
        shapes = [Shape(tmp, reg.url, name, n, mib, args.scale, data, svc_path)
                  for name, n, mib in SHAPES if n in chosen]
        rows, fetch_rows, setup_notes = [], [], []
        for sh in shapes:
            sh.setup()
            setup_notes.append(f"{sh.name}: {sh.nfiles} files, tar {sh.tar_total / MiB:,.0f} MiB, OCI blobs "
                               f"{sh.oci_bytes / MiB:,.0f} MiB (gzip -1, pushed in {sh.t_push_oci:.1f}s), "
                               f"overlaybd blobs {sh.obd_bytes / MiB:,.0f} MiB incl. base layer "
                               f"(converted in {sh.t_convert:.1f}s)")
            print(f"bench_seed: {setup_notes[-1]}", flush=True)
            sh.pull_obd()           # untimed warm-up (code paths, registry's first reads) + check
            bp = {k: [] for k in ("build OCI", "push OCI", "build overlaybd", "push overlaybd")}
            cases = [("pull OCI", sh.pull_oci), ("pull overlaybd", sh.pull_obd),
                     ("build+push OCI", lambda: sh.build_push_oci(new_tar, bp)),
                     ("build+push overlaybd", lambda: sh.build_push_obd(new_tar, bp))]
            sh.fetched.clear()
            t = interleaved(cases, args.rounds)
            t.update(bp)
            for step in ("pull", "build", "push"):
                b, c = t[f"{step} OCI"], t[f"{step} overlaybd"]
                r_best = best(c) / best(b)
                r_med = statistics.median(ci / bi for bi, ci in zip(b, c))
                rows.append([sh.name if step == "pull" else "", step, f"{best(b):.2f}", f"{best(c):.2f}",
                             f"{r_best:.3f}", f"{r_med:.3f}", f"{spread(b):.0f}%/{spread(c):.0f}%"])
            fetched = min(f for f, _ in sh.fetched)
            attach = min(a for _, a in sh.fetched)
            fetch_rows.append([sh.name, f"{sh.oci_bytes / MiB:,.1f}", f"{sh.obd_bytes / MiB:,.1f}",
                               f"{fetched / MiB:.2f}", f"{100 * fetched / sh.obd_bytes:.2f}%",
                               f"{100 * fetched / sh.oci_bytes:.2f}%", f"{attach:.2f}"])
        table(f"bench_seed: OCI vs overlaybd, local registry, image ~{1024 * args.scale:,.0f} MiB per shape "
              f"(--scale {args.scale:g})",
              ["image", "step", "OCI s", "overlaybd s", "ratio", "ratio med", "spread OCI/obd"], rows,
              ["ratio = best overlaybd time / best OCI time over "
               f"{args.rounds} interleaved rounds (below 1: overlaybd faster); ratio med = median per-round ratio",
               "pull: OCI = GET all blobs (3 at a time) + tar -xzf in order into one dir (no sync); overlaybd = "
               "manifest + open_image (empty cache) + FUSE + loop + ext4 mount + read of one 1 MiB file "
               "of the top layer (RunningImage, `tcmu-obd run`'s path)",
               f"build: a {args.build_mib} MiB tar ({args.build_mib} files) written onto the image: OCI = tar -xf "
               "into a fresh upper dir + sync; overlaybd = apply_layer onto a fresh RW upper over the remote "
               "image (FUSE + loop + ext4, fsync)",
               "push: OCI = tar -czf (gzip -6) of the upper + sha256 + upload; overlaybd = commit -z -t "
               "(lz4 4 KiB) + sha256 + upload",
               *setup_notes, env_line()])
        table("bench_seed: bytes fetched by the overlaybd pull (attach + first 1 MiB read)",
              ["image", "OCI blobs MiB", "obd blobs MiB", "fetched MiB", "of obd", "of OCI", "attach s"],
              fetch_rows,
              ["fetched = bytes returned by the remote blob reads of the run (RunningImage.fetched(), "
               "smallest over the rounds); a full OCI pull fetches 100% of the OCI blobs",
               "attach s = manifest to ext4 mounted, best round (the pull row adds the first read)"])
    print(f"\nbench_seed: {time.perf_counter() - t_start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
