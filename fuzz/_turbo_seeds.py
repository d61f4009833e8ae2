#!/usr/bin/env python3
"""Writes the seed corpora of fuzz_turbo and fuzz_turbometa from real
outputs of the tools: a small layer tar (every entry kind, whiteouts, an
opaque dir, long names, PAX xattrs; GNU and PAX formats), the header dump
`turboOCI-apply --export` writes for it, and the turboOCIv1.tar.gz meta
blob that `tcmu-obd convert --turboOCI` packs (convert_turbo.meta_archive)
around a real erofs meta layer made by `overlaybd-create --turboOCI` and
`turboOCI-apply --fstype erofs` and a real gzip index.  Not a harness (no
fuzz_ prefix: scripts/test.sh does not run it); each seed is < 64 KiB.

Run: python fuzz/_turbo_seeds.py     (rewrites fuzz/corpus/fuzz_turbo*/)
"""
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def layer_tar(fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        def add(name, kind, data=b"", **kw):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.mode = kind, 1700000000, 0o755 if kind == tarfile.DIRTYPE else 0o644
            for k, v in kw.items():
                setattr(ti, k, v)
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("etc", tarfile.DIRTYPE)
        add("etc/hosts", tarfile.REGTYPE, b"127.0.0.1 localhost\n" * 3)
        add("etc/" + "long-name-" * 12, tarfile.REGTYPE, b"x" * 700)
        add("etc/link", tarfile.SYMTYPE, linkname="hosts")
        add("etc/hard", tarfile.LNKTYPE, linkname="etc/hosts")
        add("etc/" + "d" * 90 + "/deep", tarfile.SYMTYPE, linkname="../" + "t" * 120)
        add("dev", tarfile.DIRTYPE)
        add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("dev/fifo", tarfile.FIFOTYPE)
        add("opq", tarfile.DIRTYPE)
        add("opq/.wh..wh..opq", tarfile.REGTYPE)
        add(".wh.gone", tarfile.REGTYPE)
        if fmt == tarfile.PAX_FORMAT:
            add("xattr", tarfile.REGTYPE, b"data", pax_headers={"SCHILY.xattr.user.k": "v",
                                                                "mtime": "1700000000.5"})
        add("empty", tarfile.REGTYPE)
    return buf.getvalue()


def write_seed(dirname, data):
    d = os.path.join(HERE, "corpus", dirname)
    os.makedirs(d, exist_ok=True)
    assert len(data) < 64 << 10, (dirname, len(data))
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def run(*argv):
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", *argv], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)


def turbo_seeds(tmp):
    """fuzz_turbo: mode byte + a tar or a dump (see fuzz_turbo's docstring)."""
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        raw = layer_tar(fmt)
        path = os.path.join(tmp, f"layer{fmt}.tar")
        with open(path, "wb") as f:
            f.write(raw)
        dump = os.path.join(tmp, f"layer{fmt}.dump")
        run("tcmu_obd.cli.turbo_apply", "--export", path, dump)
        with open(dump, "rb") as f:
            dumped = f.read()
        write_seed("fuzz_turbo", bytes([0x10]) + raw)          # tar, --export and --import agree
        write_seed("fuzz_turbo", bytes([0x2c]) + raw)          # gzip, streamed, erofs entries
        write_seed("fuzz_turbo", bytes([0x01]) + dumped)       # --import
        write_seed("fuzz_turbo", bytes([0x29]) + dumped)       # --import, streamed, erofs entries
    rng = random.Random(5)
    for mode in (0x40, 0x70):                                   # tar recipes (bit 6)
        write_seed("fuzz_turbo", bytes([mode]) + rng.randbytes(400))
    return raw, path


def meta_seeds(tmp, tar_path):
    """fuzz_turbometa: mode byte + a turboOCIv1.tar.gz made as convert --turboOCI makes it."""
    import gzip
    from tcmu_obd.build.convert_turbo import meta_archive
    gz = tar_path + ".gz"
    with open(tar_path, "rb") as f, open(gz, "wb") as out:
        out.write(gzip.compress(f.read(), 6, mtime=0))
    ldir = os.path.join(tmp, "layer")
    os.makedirs(ldir)
    data, index = os.path.join(ldir, "writable_data"), os.path.join(ldir, "writable_index")
    run("tcmu_obd.cli.create", "--turboOCI", data, index, "64")
    cfg = os.path.join(ldir, "config.json")
    with open(cfg, "w") as f:
        json.dump({"lowers": [], "upper": {"data": data, "index": index, "target": gz}, "resultFile": ""}, f)
    svc = os.path.join(tmp, "svc.json")
    with open(svc, "w") as f:
        json.dump({}, f)
    run("tcmu_obd.cli.turbo_apply", "--fstype", "erofs", "--gz_index_path", os.path.join(ldir, "gzip.meta"),
        "--service_config_path", svc, gz, cfg)
    run("tcmu_obd.cli.commit", "--turboOCI", data, index, os.path.join(ldir, "erofs.fs.meta"), "-z")
    open(os.path.join(ldir, ".turbo.ociv1"), "wb").close()
    blob = os.path.join(tmp, "turboOCIv1.tar.gz")
    meta_archive(ldir, ["erofs.fs.meta", ".turbo.ociv1", "gzip.meta"], blob)
    with open(blob, "rb") as f:
        meta = f.read()
    write_seed("fuzz_turbometa", bytes([0]) + meta)                   # as it is
    write_seed("fuzz_turbometa", bytes([1]) + gzip.decompress(meta))  # its tar, gzipped by the harness
    small = os.path.join(tmp, "small.tar.gz")
    meta_archive(ldir, [".turbo.ociv1", "gzip.meta"], small)          # no fs.meta: refused
    with open(small, "rb") as f:
        write_seed("fuzz_turbometa", bytes([0]) + f.read())
    rng = random.Random(9)
    for _ in range(3):                                                 # archive recipes (mode 3)
        write_seed("fuzz_turbometa", bytes([3]) + rng.randbytes(300))


def main():
    for name in ("fuzz_turbo", "fuzz_turbometa"):
        shutil.rmtree(os.path.join(HERE, "corpus", name), ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="turbo-seeds-") as tmp:
        _raw, tar_path = turbo_seeds(tmp)
        meta_seeds(tmp, tar_path)


if __name__ == "__main__":
    main()
