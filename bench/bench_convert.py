"""Image-conversion throughput, in MB/s of (uncompressed) layer tar, against
GNU tar unpacking the same tar into a plain directory.  Needs root (FUSE,
loop devices, ext4 mounts); the `convert` rows also need docker-registry.

Data (built once, in memory, then written to the temp dir):
  big     8 files of 24 MiB semi-compressible bytes (192 MiB)
  small   20,000 files of 2 KiB in 200 directories (~40 MiB of data, 51 MiB tar)

Cases, per data set:
  tar -x (baseline)     `tar -xf layer.tar -C <fresh dir>` on the temp dir's file system,
                        then sync (the dir is removed untimed afterwards)
  apply                 tcmu_obd.build.apply.apply_layer onto a fresh append-only upper over
                        the bundled base layer: a blockdev device (FUSE + loop here), ext4 mount, untar,
                        unmount, detach, fsync of the upper (overlaybd-apply)
  apply + commit -z -t  the same, then the ZFile (lz4, 4 KiB) commit in the tar wrapper
                        that convert uploads
  convert (registry)    `tcmu-obd convert` of a one-layer gzip image from a local
                        docker-registry to another repository of it (download, gunzip,
                        apply, commit, upload, config, manifest), --no-reuse

MB/s counts the uncompressed tar bytes.  Every apply is checked once: the
mounted tree's files (paths, sizes, a hash of all contents) equal the tar's.
"""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from _common import (MiB, ROOT, TempDir, best, env_line, fmt, interleaved, ratio, semi_compressible,
                     spread, table, warm, write_tar)
from tcmu_obd.build import apply, convert
from tcmu_obd.image import assemble, baselayer
from tcmu_obd.serve import blockdev
from tcmu_obd.image.rw import RWLayer


def build_tar(path, files):
    """files: [(name, bytes)] -> a tar at path; returns (size, content digest)."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        write_tar(f, files)
    for name, data in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return os.path.getsize(path), h.hexdigest(), len(files)


def tree_digest(root):
    h = hashlib.sha256()
    items = []
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            with open(p, "rb") as f:
                items.append((rel, hashlib.sha256(f.read()).digest()))
    for rel, dg in sorted(items):
        h.update(rel.encode() + b"\0" + dg)
    return h.hexdigest(), len(items)


def datasets(tmp, which):
    out = {}
    if "big" in which:
        blob = bytes(semi_compressible(24 * MiB, seed=3))
        files = [(f"big/file{i}", blob[i:] + blob[:i]) for i in range(8)]
        out["big"] = (os.path.join(tmp, "big.tar"),) + build_tar(os.path.join(tmp, "big.tar"), files)
    if "small" in which:
        pool = bytes(semi_compressible(4 * MiB, seed=4))
        files = [(f"d{i % 200}/f{i}", pool[(i * 2048) % (len(pool) - 2048):][:2048]) for i in range(20000)]
        out["small"] = (os.path.join(tmp, "small.tar"),) + build_tar(os.path.join(tmp, "small.tar"), files)
    return out


class Trials:
    def __init__(self, tmp, tar_path):
        self.tmp, self.tar = tmp, tar_path
        self.n = 0

    def fresh_upper(self):
        self.n += 1
        d = os.path.join(self.tmp, f"up{self.n}")
        os.makedirs(d)
        data, index = os.path.join(d, "data"), os.path.join(d, "index")
        RWLayer.create(data, index, 64 << 30).close()
        cfg = os.path.join(d, "config.json")
        with open(cfg, "w") as f:
            json.dump({"lowers": [{"file": baselayer.path()}], "upper": {"data": data, "index": index}}, f)
        return d, cfg, data, index

    def baseline(self):
        d = os.path.join(self.tmp, "plain")
        os.makedirs(d)
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", self.tar, "-C", d], check=True)
        os.sync()
        el = time.perf_counter() - t0
        shutil.rmtree(d)
        os.sync()
        return el

    def apply(self, commit=False, check=None):
        d, cfg, data, index = self.fresh_upper()
        t0 = time.perf_counter()
        apply.apply_layer(self.tar, cfg)
        if commit:
            conv = convert.Converter(convert.Options(quiet=True))
            conv._commit(data, index, os.path.join(d, "overlaybd.commit"), "", "")
        el = time.perf_counter() - t0
        if check is not None:
            image = assemble.open_image(cfg)
            try:
                with blockdev.fuse_loop(image, d, read_only=True) as dev, \
                        apply.mounted(dev, os.path.join(d, "ro"), read_only=True) as mnt:
                    got = tree_digest(mnt)
            finally:
                image.close()
            if got != check:
                raise SystemExit(f"apply of {self.tar}: the tree differs from the tar ({got} != {check})")
        shutil.rmtree(d)
        return el


def push_gzip_image(reg, repo, tar_path):
    with open(tar_path, "rb") as f:
        raw = f.read()
    gz = gzip.compress(raw, compresslevel=1, mtime=0)
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]}}).encode()
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": reg.push_blob(repo, cfg), "size": len(cfg)},
         "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                     "digest": reg.push_blob(repo, gz), "size": len(gz)}]}
    import requests
    r = requests.put(f"{reg.url}/v2/{repo}/manifests/v1", data=json.dumps(m),
                     headers={"Content-Type": m["mediaType"]}, timeout=60)
    assert r.status_code == 201, r.text
    return len(gz)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default="big,small", help="big,small")
    ap.add_argument("--no-registry", action="store_true", help="skip the convert rows")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_convert: needs root (FUSE, loop devices, ext4 mounts); skipped")
        return 0
    which = args.data.split(",")
    with TempDir("convert") as tmp:
        sets = datasets(tmp, which)
        rows = []
        reg_ctx = None
        if not args.no_registry and shutil.which("docker-registry"):
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from registry_server import Registry
            reg_ctx = Registry()
            reg = reg_ctx.__enter__()
        try:
            for name, (path, size, digest, nfiles) in sets.items():
                warm(path)
                tr = Trials(tmp, path)
                tr.apply(check=(digest, nfiles))           # untimed correctness check + warm-up
                cases = [("tar -x (baseline)", tr.baseline), ("apply", tr.apply),
                         ("apply + commit -z -t", lambda: tr.apply(commit=True))]
                if reg_ctx is not None:
                    gz = push_gzip_image(reg, f"src/{name}", path)
                    host = reg.url.split("//", 1)[1]

                    def conv(name=name, host=host):
                        t0 = time.perf_counter()
                        convert.convert(f"{host}/src/{name}:v1", f"{host}/obd/{name}:v1",
                                        convert.Options(db_path="none", quiet=True, workdir=tmp))
                        return time.perf_counter() - t0
                    cases.append((f"convert (registry, {gz / 1e6:.0f} MB gzip)", conv))
                times = interleaved(cases, args.rounds)
                base = times["tar -x (baseline)"]
                for case, samples in times.items():
                    r_best, r_med = ratio(base, samples)
                    mbs = size / best(samples) / 1e6
                    rows.append([f"{name}: {case}", fmt(size / 1e6), f"{nfiles:,}", f"{best(samples):.2f}",
                                 fmt(mbs), fmt(nfiles / best(samples)), f"{r_best:.2f}", f"{r_med:.2f}",
                                 f"{spread(samples):.0f}%"])
        finally:
            if reg_ctx is not None:
                reg_ctx.__exit__(None, None, None)
        table("conversion throughput (MB/s of uncompressed tar)",
              ["case", "tar MB", "files", "best s", "MB/s", "files/s", "ratio", "ratio med", "spread"],
              rows, [f"{args.rounds} interleaved rounds; ratio = baseline time / case time (above 1: faster "
                     f"than GNU tar into a plain directory)", env_line()])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
