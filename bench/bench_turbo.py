"""TurboOCI vs native overlaybd: converting the same layer tar, and the images read from a local registry.

  native (baseline)   overlaybd-create --mkfs (RW layer) + overlaybd-apply (the
                      tar unpacked into the kernel's ext4 over FUSE + loop) +
                      overlaybd-commit -z: what the convertor does per layer
                      without TurboOCI
  turboOCI            overlaybd-create --turboOCI --mkfs + turboOCI-apply (metadata
                      only; file contents mapped to the tar) + overlaybd-commit
                      -z --turboOCI
  native gzip         native from the tar.gz (overlaybd-apply decompresses it)
  turboOCI gzip       TurboOCI from the tar.gz, building gzip.meta in the same pass

MB/s counts the uncompressed tar bytes over the whole create+apply+commit.
The ratio is native time / case time (above 1: faster than native); goal
>= 3x; for the gzip cases the last column compares with native gzip.  Also the committed layer's size as a fraction of the tar (the
meta blob of TurboOCI; for native the whole layer).  Every trial's output
is deleted after it; the inputs stay in the page cache.

Data: --mib MiB of files (sizes log-uniform 1 KiB..4 MiB, semi-compressible
bytes) in a PAX tar made by tarfile.  Each trial starts after os.sync() and
times only itself (the native trials leave ~0.5 GB of writeback behind).

Then, against the native overlaybd image of the same content (--remote-mib
MiB, one gzip -6 layer pushed to a docker-registry on 127.0.0.1, converted
both ways with convert.convert and convert_turbo.convert, --mkfs, 4 GiB):
  time to ready   tcmu-obd run's path (RunningImage: manifest, config.v1.json,
                  FUSE + loop, ext4 mount) with fresh caches, until the first
                  byte of a file; bytes fetched to that byte and to the whole
                  file (ratio TurboOCI / native: below 1 is better)
  warm reads      random 4 KiB reads of the same file offsets at their ext4
                  blocks, through each image opened in this process with its
                  blob cache / gzip cache warm (ratio native time / TurboOCI
                  time; goal >= 0.9)
Root only (mount, loop, FUSE); the second part needs docker-registry.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import replace

import requests

from _common import (MiB, ROOT, TempDir, env_line, fmt, interleaved, ratio, semi_compressible, spread, table,
                     write_tar)
from tcmu_obd import service_config
from tcmu_obd.build import apply, convert, convert_turbo, run, turbo
from tcmu_obd.cli import commit as commit_cli
from tcmu_obd.cli import create as create_cli
from tcmu_obd.format.ext4 import Ext4
from tcmu_obd.image import assemble, turbometa
from tcmu_obd.remote import imageref
from tcmu_obd.remote.context import RemoteContext

VSIZE_GB = 4


def make_entries(total, seed=7):
    rnd = random.Random(seed)
    blob = semi_compressible(8 * MiB, seed=seed)
    entries, n = [], 0
    while n < total:
        size = int(2 ** rnd.uniform(10, 22))
        at = rnd.randrange(0, len(blob) - size)
        entries.append((f"d{len(entries) % 37}/f{len(entries)}", bytes(blob[at:at + size])))
        n += size
    return entries


def make_tar(total, seed=7):
    entries = make_entries(total, seed)
    buf = io.BytesIO()
    write_tar(buf, entries)
    return buf.getvalue(), len(entries)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--remote-mib", type=int, default=64, help="size of the image pushed to the local registry")
    ap.add_argument("--reads", type=int, default=2000, help="warm random 4 KiB reads per round")
    ap.add_argument("--only", choices=("convert", "remote"), default=None, help="run one of the two parts")
    args = ap.parse_args()
    print(env_line())
    if args.only != "remote":
        with TempDir("bench-turbo") as tmp:
            conversion(args, tmp)
    if args.only != "convert" and not shutil.which("docker-registry"):
        print("bench_turbo: the registry part needs docker-registry (scripts/setup.sh installs it); skipped")
    elif args.only != "convert":
        with TempDir("bench-turbo-remote") as tmp:
            remote_compare(args, tmp)


def conversion(args, tmp):
    tar, nfiles = make_tar(args.mib * MiB)
    tar_path = os.path.join(tmp, "layer.tar")
    gz_path = os.path.join(tmp, "layer.tar.gz")
    with open(tar_path, "wb") as f:
        f.write(tar)
    with open(gz_path, "wb") as f:
        f.write(gzip.compress(tar, 6, mtime=0))
    sizes = {}

    def clean(*names):
        for n in names:
            p = os.path.join(tmp, n)
            if os.path.exists(p):
                os.unlink(p)

    def native_case(src, name):
        return lambda: native(src, name)

    def native(src, name):
        clean("n.data", "n.index", "n.commit")
        os.sync()               # the last trial's writeback is not charged to this one
        t0 = time.perf_counter()
        d, i = os.path.join(tmp, "n.data"), os.path.join(tmp, "n.index")
        create_cli.body(["--mkfs", d, i, str(VSIZE_GB)])
        cfg = os.path.join(tmp, "n.json")
        with open(cfg, "w") as f:
            json.dump({"lowers": [], "upper": {"data": d, "index": i}}, f)
        apply.apply_layer(src, cfg, frontend="fuse")
        commit_cli.body([d, i, os.path.join(tmp, "n.commit"), "-z"])
        el = time.perf_counter() - t0
        sizes[name] = os.path.getsize(os.path.join(tmp, "n.commit"))
        return el

    def turbo_case(src, name):
        def run():
            clean("t.fsmeta", "t.index", "t.commit", "gzip.meta")
            os.sync()
            t0 = time.perf_counter()
            d, i = os.path.join(tmp, "t.fsmeta"), os.path.join(tmp, "t.index")
            create_cli.body(["--turboOCI", "--mkfs", d, i, str(VSIZE_GB)])
            cfg = os.path.join(tmp, "t.json")
            with open(cfg, "w") as f:
                json.dump({"lowers": [], "upper": {"data": d, "index": i, "target": src}}, f)
            turbo.turbo_apply(src, cfg, gz_index_path=os.path.join(tmp, "gzip.meta"), frontend="fuse")
            commit_cli.body([d, i, os.path.join(tmp, "t.commit"), "-z", "--turboOCI"])
            el = time.perf_counter() - t0
            sizes[name] = os.path.getsize(os.path.join(tmp, "t.commit"))
            if os.path.exists(os.path.join(tmp, "gzip.meta")):
                sizes[name + " index"] = os.path.getsize(os.path.join(tmp, "gzip.meta"))
            return el
        return run

    cases = [("native", native_case(tar_path, "native")), ("turboOCI", turbo_case(tar_path, "turboOCI")),
             ("native gzip", native_case(gz_path, "native gzip")),
             ("turboOCI gzip", turbo_case(gz_path, "turboOCI gzip"))]
    times = interleaved(cases, args.rounds)
    rows = []
    for name, _ in cases:
        t = statistics.median(times[name])
        r_best, r_med = ratio(times["native"], times[name])
        same = "native gzip" if "gzip" in name else "native"
        r_same = ratio(times[same], times[name])[1]
        meta = sizes[name] + sizes.get(name + " index", 0)
        rows.append([name, fmt(len(tar) / t / 1e6), fmt(t, 2), fmt(r_med, 2), fmt(r_best, 2),
                     fmt(r_same, 2), f"{meta:,}", f"{100.0 * meta / len(tar):.2f} %"])
    table(f"layer conversion: {len(tar) / MiB:.0f} MiB tar, {nfiles} files, vsize {VSIZE_GB} GiB, "
          f"{args.rounds} rounds",
          ["case", "MB/s", "s (median)", "x native (median)", "x native (best)",
           "x same-input native", "layer bytes", "of the tar"], rows,
          [env_line(), "layer bytes: the committed -z layer (+ gzip.meta for the gzip case)",
           "native and TurboOCI both use FUSE + loop for the kernel's ext4",
           "goal: TurboOCI >= 3x the native conversion of the same input (x same-input native)"])


# ------------------------------------------------------------------ vs the native image, from a registry
def push_oci(base, repo, tar, gz):
    """A one-layer OCI image (the tar.gz) pushed to the local registry."""
    from bench_seed import push_blob
    desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": push_blob(base, repo, gz),
            "size": len(gz)}
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]}}).encode()
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": push_blob(base, repo, cfg), "size": len(cfg)}, "layers": [desc]}
    r = requests.put(f"{base}/v2/{repo}/manifests/v1", data=json.dumps(m).encode(),
                     headers={"Content-Type": m["mediaType"]}, timeout=30)
    assert r.status_code == 201, r.text


def manifest_layer_bytes(base, repo):
    r = requests.get(f"{base}/v2/{repo}/manifests/v1", timeout=30, headers={"Accept": ", ".join([
        "application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"])})
    r.raise_for_status()
    return sum(layer["size"] for layer in r.json()["layers"])


def with_dirs(svc, d):
    """The service config with its blob cache and gzip cache in the fresh directory d."""
    return replace(svc, cache_config=replace(svc.effective_cache, cache_dir=os.path.join(d, "cache")),
                   gzip_cache_config=replace(svc.gzip_cache_config, cache_dir=os.path.join(d, "gzcache")))


def open_in_process(ref_text, svc, d):
    """What `tcmu-obd run` opens (manifest -> lowers -> config.v1.json ->
    assemble.open_image), kept in this process: (Image, RemoteContext)."""
    ref = imageref.parse_ref(ref_text, True)
    with imageref.client_from_service_config(svc) as client:
        manifest, where = imageref.fetch_image_manifest(client, ref, ["linux", "amd64"])
        lowers = imageref.overlaybd_lowers(manifest, where, turbo_ok=True)
        lowers = turbometa.resolve(client, ref, lowers, os.path.join(d, "layers"))
    cfg = os.path.join(d, "config.v1.json")
    with open(cfg, "w") as f:
        json.dump({"repoBlobUrl": ref.repo_blob_url, "lowers": lowers, "upper": {}}, f)
    remote = RemoteContext(svc)
    return assemble.open_image(cfg, svc, remote=remote), remote


def remote_compare(args, tmp):
    """TurboOCI image vs the native overlaybd image of the same one-layer OCI
    image, both converted from the local registry and read back from it."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from registry_server import Registry
    entries = make_entries(args.remote_mib * MiB, seed=11)
    buf = io.BytesIO()
    write_tar(buf, entries)
    tar = buf.getvalue()
    gz = gzip.compress(tar, 6, mtime=0)
    files = dict(entries)
    rng = random.Random(5)
    big = [n for n, data in entries if len(data) >= 256 * 1024]
    probe = big[len(big) // 2]                       # the file read for time to ready / bytes fetched
    chosen = rng.sample(big, min(24, len(big)))      # the files of the warm random reads
    with Registry() as reg:
        host = reg.url.split("//", 1)[1]
        push_oci(reg.url, "oci/t", tar, gz)
        svc_path = os.path.join(tmp, "overlaybd.json")
        with open(svc_path, "w") as f:
            json.dump({"cacheConfig": {"cacheType": "file", "cacheDir": os.path.join(tmp, "cache"),
                                       "cacheSizeGB": 4, "refillSize": 262144},
                       "gzipCacheConfig": {"enable": True, "cacheDir": os.path.join(tmp, "gzcache"),
                                           "cacheSizeGB": 4, "refillSize": 262144},
                       "credentialConfig": {"mode": "file", "path": os.path.join(tmp, "cred.json")}}, f)
        svc = service_config.load(svc_path)
        refs = {"native": f"{host}/obd/t:v1", "turboOCI": f"{host}/turbo/t:v1"}
        opts = convert.Options(db_path="none", quiet=True, workdir=tmp, plain_http=True, mkfs=True, vsize_gb=4)
        convert.convert(f"{host}/oci/t:v1", refs["native"], opts)
        convert_turbo.convert(f"{host}/oci/t:v1", refs["turboOCI"], replace(opts, turbo=True))
        layer_bytes = {k: manifest_layer_bytes(reg.url, refs[k].split("/", 1)[1].split(":")[0]) for k in refs}
        # what each image has in the registry; a TurboOCI image's layers are its meta blobs, which
        # `run` downloads whole before the device is up (counted as fetched), plus the original tar.gz
        blob_bytes = {"native": layer_bytes["native"], "turboOCI": layer_bytes["turboOCI"] + len(gz)}
        upfront = {"native": 0, "turboOCI": layer_bytes["turboOCI"]}
        fetched, n = {k: [] for k in refs}, [0]

        def ready(kind):
            def trial():
                n[0] += 1
                d = os.path.join(tmp, f"run-{kind}-{n[0]}")
                os.makedirs(d)
                s = with_dirs(svc, d)
                t0 = time.perf_counter()
                with run.RunningImage(refs[kind], plain_http=True, service_cfg=s,
                                      cache_dir=os.path.join(d, "cache")) as img:
                    with open(os.path.join(img.mountpoint, probe), "rb") as f:
                        first = f.read(1)
                        el = time.perf_counter() - t0
                        at_first = img.fetched()
                        rest = f.read()
                    fetched[kind].append((upfront[kind] + at_first, upfront[kind] + img.fetched()))
                if first + rest != files[probe]:
                    raise SystemExit(f"bench_turbo: {kind}: {probe} read back differs")
                shutil.rmtree(d)
                return el
            return trial
        times = interleaved([(k, ready(k)) for k in refs], args.rounds)
        rows = []
        for k in refs:
            r_best, r_med = ratio(times[k], times["native"])      # case / native: below 1 = TurboOCI faster
            f_first = statistics.median(a for a, _ in fetched[k])
            f_file = statistics.median(b for _, b in fetched[k])
            rows.append([k, fmt(min(times[k]), 3), fmt(statistics.median(times[k]), 3), f"{r_best:.2f}",
                         f"{f_first:,.0f}", f"{f_file:,.0f}",
                         f"{f_file / statistics.median(b for _, b in fetched['native']):.2f}",
                         f"{blob_bytes[k]:,}"])
        table(f"from the local registry: time to ready (config -> first byte of a {len(files[probe]) // 1024} KiB "
              f"file) and bytes fetched to read it, {len(tar) / MiB:.0f} MiB one-layer image, {args.rounds} rounds",
              ["image", "ready s (best)", "ready s (median)", "x native time", "fetched to 1st byte",
               "fetched for the file", "x native bytes", "blob bytes"], rows,
              [env_line(), "fresh blob cache and gzip cache per trial; RunningImage (tcmu-obd run's path: "
               "manifest, config.v1.json, FUSE + loop, ext4 mount) then open + read(1) of the file",
               "fetched: bytes the registry client received + for TurboOCI the meta blob (fs metadata and "
               "gzip.meta), which is downloaded whole before the device is up",
               "blob bytes: the image's layers in the registry (TurboOCI: the meta blob + the original tar.gz)"])

        # warm caches: random 4 KiB reads of the chosen files' blocks, in-process images
        images, ctxs, offs = {}, [], {}
        for k in refs:
            d = os.path.join(tmp, f"warm-{k}")
            os.makedirs(d)
            img, remote = open_in_process(refs[k], with_dirs(svc, d), d)
            images[k] = img
            ctxs.append(remote)
            fs = Ext4(img.pread, img.virtual_size, k)
            exts = []
            for name in chosen:
                got = b"".join(img.pread(off, ln) for off, ln in fs.file_extents("/" + name))
                if got[:len(files[name])] != files[name]:
                    raise SystemExit(f"bench_turbo: warm {k}: {name} differs")
                exts += [(off, ln) for off, ln in fs.file_extents("/" + name)]
            # the same file bytes in both images: pick (file, offset in file) once, map per image
            offs[k] = exts
        picks = []
        prng = random.Random(9)
        for _ in range(args.reads):
            name = prng.choice(chosen)
            picks.append((name, prng.randrange(0, len(files[name]) // 4096) * 4096))

        def disk_offsets(k):
            out = []
            fs = Ext4(images[k].pread, images[k].virtual_size, k)
            maps = {name: fs.file_extents("/" + name) for name in chosen}
            for name, fo in picks:
                for off, ln in maps[name]:
                    if fo < ln:
                        out.append(off + fo)
                        break
                    fo -= ln
            return out
        disk = {k: disk_offsets(k) for k in refs}
        rb = bytearray(4096)
        for k in refs:
            for (name, fo), off in zip(picks, disk[k]):     # every read checked once, untimed
                images[k].read_into(rb, off)
                want = files[name][fo:fo + 4096]
                if bytes(rb[:len(want)]) != want:
                    raise SystemExit(f"bench_turbo: warm {k}: {name} at {fo} differs")

        def reads(k):
            def go():
                img, b = images[k], rb
                for off in disk[k]:
                    img.read_into(b, off)
            return go
        times = interleaved([(k, reads(k)) for k in refs], args.rounds + 2)
        rows = []
        for k in refs:
            r_best, r_med = ratio(times["native"], times[k])
            t = min(times[k])
            rows.append([k, fmt(args.reads / t), fmt(t / args.reads * 1e6), f"{r_best:.2f}", f"{r_med:.2f}",
                         f"{spread(times[k]):.0f}%"])
        table(f"warm caches: random 4 KiB reads of {len(chosen)} files inside the image, {args.reads} reads x "
              f"{args.rounds + 2} rounds",
              ["image", "reads/s", "us/read", "x native (best)", "x native (median)", "spread"], rows,
              [env_line(), "Image.read_into at the files' ext4 blocks (the same file offsets in both images), "
               "every chosen file read once first (blob cache / gzip cache warm); goal TurboOCI >= 0.9x native",
               "native: the lz4 ZFile layer from the blob cache; TurboOCI: the warp meta layer + the tar from "
               "the gzip cache"])
        for img in images.values():
            img.close()
        for c in ctxs:
            c.close()


if __name__ == "__main__":
    main()
