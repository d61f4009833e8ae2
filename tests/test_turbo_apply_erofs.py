"""turboOCI-apply --fstype erofs end to end with the real tools: a plain tar
as the first erofs meta layer (no lowers), overlaybd-commit -z --turboOCI,
then a gzip'd second layer (whiteouts, opaque directory, replaced files, a
new hard link to a lower inode) applied over the first meta layer + tar as a
warp lower; `tcmu-obd export` of the config {lowers: [{file: meta,
targetFile: tar (+ gzipIndex)}]} must mount as erofs (loop, read-only) and
equal the tars unpacked by build/untar.py.  Also the erofs-only bad input:
--mkfs, a warp layer too small for the metadata, a non-empty upper."""
import gzip
import hashlib
import json
import os
import subprocess
import sys

from erofs_util import diff, have_erofs, mounted, oracle, scan, tar_bytes
from test_erofs_incremental import layer1, layer2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(mod, *args, check=True):
    p = subprocess.run([sys.executable, "-m", f"tcmu_obd.cli.{mod}", *map(str, args)],
                       capture_output=True, timeout=300, cwd=ROOT)
    if check and p.returncode:
        raise AssertionError(f"{mod} {args}: exit {p.returncode}\n{p.stderr.decode()}")
    return p


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def warp(tmp, name, target, lowers=(), vsize_gib=1, gzip_index=None):
    cfg = os.path.join(tmp, name + ".json")
    up = {"data": os.path.join(tmp, name + ".fsmeta"), "index": os.path.join(tmp, name + ".index"),
          "target": target}
    if gzip_index:
        up["gzipIndex"] = gzip_index
    with open(cfg, "w") as f:
        json.dump({"lowers": list(lowers), "upper": up}, f)
    run("create", "--turboOCI", up["data"], up["index"], vsize_gib)
    return cfg, up


def test_turbo_apply_erofs_two_layers_export_mounts_as_the_model(tmp_path):
    have_erofs()
    tmp = str(tmp_path)
    svc = write(tmp_path / "svc.json", b"{}")
    t1, t2 = tar_bytes(layer1()), tar_bytes(layer2())
    tar1 = write(tmp_path / "l1.tar", t1)
    gz2 = write(tmp_path / "l2.tar.gz", gzip.compress(t2, mtime=0))

    cfg1, up1 = warp(tmp, "w1", tar1)
    p = run("turbo_apply", "--fstype", "erofs", tar1, cfg1, "--service_config_path", svc)
    assert b"turboOCI-apply done" in p.stdout
    meta1 = str(tmp_path / "l1.meta")
    run("commit", up1["data"], up1["index"], meta1, "-z", "--turboOCI")
    lower1 = {"file": meta1, "targetFile": tar1}

    gzmeta = str(tmp_path / "l2.gzip.meta")
    cfg2, up2 = warp(tmp, "w2", gz2, lowers=[lower1])
    run("turbo_apply", "--fstype", "erofs", gz2, cfg2, "--service_config_path", svc,
        "--gz_index_path", gzmeta)
    assert os.path.getsize(gzmeta) > 0
    meta2 = str(tmp_path / "l2.meta")
    run("commit", up2["data"], up2["index"], meta2, "-z", "-t", "--turboOCI")

    for n, lowers, tars in ((1, [lower1], [t1]),
                            (2, [lower1, {"file": meta2, "targetFile": gz2, "gzipIndex": gzmeta}], [t1, t2])):
        cfg = os.path.join(tmp, f"image{n}.json")
        with open(cfg, "w") as f:
            json.dump({"lowers": lowers, "resultFile": os.path.join(tmp, f"result{n}")}, f)
        raw = str(tmp_path / f"disk{n}.raw")
        run("main", "export", cfg, raw)
        want = scan(oracle(tmp_path / f"o{n}", tars))
        with mounted(raw) as mnt:
            got = scan(mnt)
        assert diff(got, want, skip_mtime={"quiet"} if n == 2 else ()) == [], f"layer {n}"
        assert len(got[0]) > 15


def test_turbo_apply_erofs_bad_input(tmp_path):
    tmp = str(tmp_path)
    svc = write(tmp_path / "svc.json", b"{}")
    tar1 = write(tmp_path / "l1.tar", tar_bytes(layer1()))
    cfg, up = warp(tmp, "w", tar1)
    p = run("turbo_apply", "--fstype", "erofs", "--mkfs", tar1, cfg, "--service_config_path", svc,
            check=False)
    assert p.returncode and b"--mkfs makes ext4" in p.stderr
    # a warp layer of 4 KiB cannot hold the metadata
    small_cfg = os.path.join(tmp, "small.json")
    small = {"data": os.path.join(tmp, "s.fsmeta"), "index": os.path.join(tmp, "s.index"), "target": tar1}
    with open(small_cfg, "w") as f:
        json.dump({"lowers": [], "upper": small}, f)
    from tcmu_obd.image.warp_rw import WarpRWLayer
    WarpRWLayer.create(small["data"], small["index"], 8192).close()
    p = run("turbo_apply", "--fstype", "erofs", tar1, small_cfg, "--service_config_path", svc, check=False)
    assert p.returncode and b"virtual size is 8192" in p.stderr, p.stderr
    # applied twice into the same upper
    run("turbo_apply", "--fstype", "erofs", tar1, cfg, "--service_config_path", svc)
    p = run("turbo_apply", "--fstype", "erofs", tar1, cfg, "--service_config_path", svc, check=False)
    assert p.returncode and b"is not empty" in p.stderr and up["data"].encode() in p.stderr
    # a corrupt tar names the input
    bad = write(tmp_path / "bad.tar", b"\x01" * 1024)
    cfg3, _ = warp(tmp, "w3", bad)
    p = run("turbo_apply", "--fstype", "erofs", bad, cfg3, "--service_config_path", svc, check=False)
    assert p.returncode and b"bad.tar" in p.stderr, p.stderr
    assert b"Traceback" not in p.stderr


def test_turbo_apply_erofs_import_dump_equals_the_tar(tmp_path):
    """--import of an --export header dump builds the same erofs meta layer
    (metadata bytes and mappings) as the tar itself."""
    tmp = str(tmp_path)
    svc = write(tmp_path / "svc.json", b"{}")
    tar1 = write(tmp_path / "l1.tar", tar_bytes(layer1()))
    dump = str(tmp_path / "l1.dump")
    run("turbo_apply", "--export", tar1, dump, "--service_config_path", svc)
    cfg_a, up_a = warp(tmp, "a", tar1)
    cfg_b, up_b = warp(tmp, "b", tar1)
    run("turbo_apply", "--fstype", "erofs", tar1, cfg_a, "--service_config_path", svc)
    run("turbo_apply", "--fstype", "erofs", "--import", dump, cfg_b, "--service_config_path", svc)
    from tcmu_obd.image.warp_rw import WarpRWLayer
    got = []
    for up in (up_a, up_b):
        layer = WarpRWLayer.open(up["data"], up["index"])
        try:
            recs = [tuple(r) for r in layer.records()]
        finally:
            layer.close()
        with open(up["data"], "rb") as f:
            got.append((recs, hashlib.sha256(f.read()).hexdigest()))
    assert got[0] == got[1]
    assert any(r[-1] == 1 for r in got[0][0])          # tag-1 mappings exist
