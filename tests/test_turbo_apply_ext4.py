"""turboOCI-apply on the real kernel ext4 (FUSE + loop, root only), with real
tars made by tarfile: every entry kind of tests/test_apply_untar.py (odd
sizes, hard links, symlinks, devices, xattrs, long names, whiteouts and
opaque directories over a lower layer), plus big files, mapped to the tar
instead of copied.  Checked against that file's Model: through the warp upper
(gzip target read through the index the apply built), and after
overlaybd-commit --turboOCI -z, with the committed meta layer read with its
target (the stack built here, tag 0 -> meta layer, tag 1 -> tar); e2fsck -fn
clean each time.  Also --export/--import, overlaybd-apply --gz_index_path and
bad input."""
import gzip
import json
import os
import struct
import subprocess
import sys
import tarfile

import pytest

from test_apply_untar import (BIG, E, H, Model, R, compare, layer1, layer2, missing, new_image,
                              tar_bytes)
from tcmu_obd import core
from tcmu_obd.build import apply
from tcmu_obd.format import lsmt
from tcmu_obd.format.gzindex import build_index
from tcmu_obd.image import assemble, baselayer, config
from tcmu_obd.image.layer import unwrap
from tcmu_obd.serve import blockdev

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30


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


def extra_files():
    """Big and odd-sized files, one mostly zeros, one of exactly 4 KiB."""
    sparse = bytearray(9 << 20)
    sparse[123:130] = b"payload"
    sparse[(7 << 20) + 5:(7 << 20) + 12] = b"late!!!"
    return [E("big/sparse", R, bytes(sparse)), E("big/odd", R, os.urandom(1_234_567)),
            E("big/page", R, os.urandom(4096)), E("big/one", R, b"1"),
            E("big/one.hl", H, linkname="big/one"), E("data/big.copy", R, BIG[:5_000_001])]


def warp_config(tmp, name, target, lowers=(), gzip_index=""):
    cfg = os.path.join(tmp, name + ".json")
    upper = {"data": os.path.join(tmp, name + ".fsmeta"), "index": os.path.join(tmp, name + ".index"),
             "target": target}
    if gzip_index:
        upper["gzipIndex"] = gzip_index
    with open(cfg, "w") as f:
        json.dump({"lowers": [{"file": p} for p in lowers], "upper": upper}, f)
    return cfg, upper


def image_checked(cfg_path, tmp, model):
    """The warp-upper image of cfg_path: e2fsck -fn clean, then mounted and compared."""
    cfg = config.load(cfg_path, warp_upper=True)
    with blockdev.image_device(cfg.path, lambda: assemble.open_image(cfg), tmp, read_only=True,
                               frontend="fuse") as d:
        fsck = subprocess.run(["e2fsck", "-fn", d.path], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        with apply.mounted(d.path, os.path.join(tmp, "ro"), read_only=True) as mnt:
            return compare(model, mnt)


def committed_raw(meta_path, target, raw_path):
    """The disk of a committed warp meta layer + its target (a Backing), as a
    sparse raw file: only the mapped ranges are written."""
    fd = os.open(meta_path, os.O_RDONLY)
    try:
        backing = unwrap(fd, meta_path)[0]
        trailer = lsmt.LsmtHeader.unpack(backing.pread(backing.size - 4096, 4096), meta_path, "trailer")
        index = core.Index.from_raw(backing.pread(trailer.index_offset, trailer.index_size * 16),
                                    keep_tags=True)
        stack = core.Stack([backing, target], index)
        recs = index.records()
        with open(raw_path, "wb") as out:
            out.truncate(trailer.virtual_size)
            for off, length, _m, _z, _t in recs:
                out.seek(off * 512)
                out.write(stack.read(off * 512, length * 512))
        return recs, trailer
    finally:
        os.close(fd)


def test_turbo_apply_ext4_gzip_layer_matches_model_and_commits(tmp_path):
    tmp = str(tmp_path)
    entries = layer1() + extra_files()
    tar = tar_bytes(entries)
    tar_path = write(tmp_path / "layer.tar", tar)
    gz_path = write(tmp_path / "layer.tar.gz", gzip.compress(tar, mtime=0))
    model = Model()                      # mkfs: a root and lost+found, as the model starts
    model.apply(entries)

    cfg, up = warp_config(tmp, "w", gz_path)     # as ACI: the gzip blob, no gzipIndex in the upper
    run("create", "--turboOCI", "--mkfs", up["data"], up["index"], 1)
    svc = write(tmp_path / "svc.json", b"{}")
    gzmeta = str(tmp_path / "gzip.meta")
    p = run("turbo_apply", gz_path, cfg, "--gz_index_path", gzmeta, "--service_config_path", svc)
    assert p.stdout.decode().strip().endswith("turboOCI-apply done")
    # the index, built in the same pass, is the one a separate pass builds
    with open(gz_path, "rb") as f:
        build_index(f, str(tmp_path / "ref.meta"))
    assert open(gzmeta, "rb").read() == open(tmp_path / "ref.meta", "rb").read()
    # the file data is in no layer file: fsmeta holds metadata only
    assert os.stat(up["data"]).st_blocks * 512 < len(tar) // 2

    # through the warp upper, the gzip target read through the index
    cfg2, _ = warp_config(tmp, "w", gz_path, gzip_index=gzmeta)
    assert image_checked(cfg2, tmp, model) > 40

    # commit -z: the meta layer, then read with the plain tar as its target
    out = str(tmp_path / "ext4.fs.meta")
    run("commit", up["data"], up["index"], out, "-z", "--turboOCI")
    assert os.path.getsize(out) < len(tar) // 10
    tfd = os.open(tar_path, os.O_RDONLY)
    try:
        recs, trailer = committed_raw(out, core.RawBacking(tfd, 0, len(tar), tar_path),
                                      str(tmp_path / "disk.raw"))
    finally:
        os.close(tfd)
    assert trailer.virtual_size == 1 * GiB
    assert {r[4] for r in recs} == {0, 1} and not any(r[3] for r in recs)
    # every regular file's content, 512-rounded, is mapped to the tar exactly once
    remote = sum(r[1] for r in recs if r[4] == 1) * 512
    assert remote == sum(-(-len(d) // 512) * 512 for _n, k, d, _kw in entries if k == R)
    fsck = subprocess.run(["e2fsck", "-fn", str(tmp_path / "disk.raw")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    with blockdev.raw_loop(str(tmp_path / "disk.raw")) as dev, \
            apply.mounted(dev, os.path.join(tmp, "ro2"), read_only=True) as mnt:
        compare(model, mnt)


def test_turbo_apply_import_export_over_a_lower_with_whiteouts(tmp_path):
    """Layer 1 a normal overlaybd layer on the base layer; layer 2 (whiteouts,
    opaque dirs, replacements, hard links into the lower) as a TurboOCI warp
    upper fed from an --export header dump with --import."""
    tmp = str(tmp_path)
    model = Model()
    l1, l2 = layer1(), layer2() + [E("l2/big", R, os.urandom(3 << 20) + b"x")]
    cfg1, data1, index1 = new_image(tmp, [baselayer.path()], name="l1")
    apply.apply_layer(write(tmp_path / "l1.tar", tar_bytes(l1)), cfg1)
    model.apply(l1)
    c1 = str(tmp_path / "l1.commit")
    run("commit", data1, index1, c1, "-z")

    t2 = tar_bytes(l2)
    tar2 = write(tmp_path / "l2.tar", t2)
    dump = str(tmp_path / "l2.headers")
    p = run("turbo_apply", "--export", tar2, dump)
    assert b"turboOCI-apply done" in p.stdout
    raw = open(dump, "rb").read()
    assert len(raw) % 512 == 0 and len(raw) < len(t2)
    # every regular file's header carries its content offset at bytes 329..336
    offsets = {}
    with tarfile.open(tar2) as tf:
        for m in tf.getmembers():
            if m.isreg():
                offsets[m.name] = m.offset_data
    found = set()
    for i in range(0, len(raw), 512):
        blk = raw[i:i + 512]
        if blk[156:157] == b"0" and blk[257:262] == b"ustar":
            name = blk[:100].rstrip(b"\0").decode()
            off = struct.unpack_from("<q", blk, 329)[0]
            if name in offsets:
                assert off == offsets[name], name
                found.add(name)
    assert "l2/big" in found

    cfg2, up = warp_config(tmp, "l2", tar2, lowers=[baselayer.path(), c1])
    run("create", "--turboOCI", up["data"], up["index"], 64)
    svc = write(tmp_path / "svc.json", b"{}")
    run("turbo_apply", "--import", dump, cfg2, "--service_config_path", svc)
    model.apply(l2)
    image_checked(cfg2, tmp, model)


def test_overlaybd_apply_gz_index_path(tmp_path):
    tmp = str(tmp_path)
    cfg, _data, _index = new_image(tmp, [baselayer.path()])
    t = tar_bytes([E("f", R, os.urandom(300000))])
    gz = write(tmp_path / "l.tar.gz", gzip.compress(t, mtime=0))
    run("apply", "--gz_index_path", tmp_path / "g.meta", gz, cfg)
    with open(gz, "rb") as f:
        build_index(f, str(tmp_path / "ref.meta"))
    assert (tmp_path / "g.meta").read_bytes() == (tmp_path / "ref.meta").read_bytes()
    # a plain tar: no index
    run("apply", "--gz_index_path", tmp_path / "g2.meta", write(tmp_path / "l.tar", t), cfg)
    assert not (tmp_path / "g2.meta").exists()


def test_turbo_apply_bad_input(tmp_path):
    tmp = str(tmp_path)
    t = tar_bytes([E("a", R, b"x" * 5000), E("b", R, b"y")])
    tar = write(tmp_path / "l.tar", t)
    svc = write(tmp_path / "svc.json", b"{}")
    cfg, up = warp_config(tmp, "w", tar)
    run("create", "--turboOCI", "--mkfs", up["data"], up["index"], 1)

    p = run("turbo_apply", tar, cfg, "--fstype", "erofs", "--service_config_path", svc, check=False)
    assert p.returncode == 1 and b"is not empty" in p.stderr       # erofs over the mkfs'd warp layer
    p = run("turbo_apply", tar, cfg, "--service_config_path", tmp_path / "nope.json", check=False)
    assert p.returncode == 1 and b"nope.json: no such file" in p.stderr
    plain, _d, _i = new_image(tmp, [baselayer.path()], name="plain")
    p = run("turbo_apply", tar, plain, "--service_config_path", svc, check=False)
    assert p.returncode == 1 and b"upper.target is empty" in p.stderr
    # the daemon's view of the same config refuses the warp upper
    p = run("main", "export", cfg, tmp_path / "x", check=False)
    assert p.returncode != 0 and b"upper.target" in p.stderr and b"build tools only" in p.stderr

    bad = bytearray(t)
    with tarfile.open(tar) as tf:
        second = tf.getmember("b").offset
    bad[second + 148] ^= 0x01                         # the second header's checksum
    for data, what in ((t[:700], b"truncated tar"), (bytes(bad), b"invalid header at byte")):
        p = run("turbo_apply", write(tmp_path / "bad.tar", data), cfg, "--service_config_path", svc,
                check=False)
        assert p.returncode == 1 and what in p.stderr, p.stderr
    # a header dump whose content offset is not a multiple of 512
    dump = str(tmp_path / "h")
    run("turbo_apply", "--export", tar, dump)
    raw = bytearray(open(dump, "rb").read())
    struct.pack_into("<q", raw, 329, 1001)
    p = run("turbo_apply", "--import", write(tmp_path / "h2", bytes(raw)), cfg,
            "--service_config_path", svc, check=False)
    assert p.returncode == 1 and b"content offset 1001" in p.stderr


def test_turbo_two_layers_exported_through_warp_lowers(tmp_path):
    """Two TurboOCI layers built as the convertor does (layer 2 applied over
    layer 1's meta layer + tar as a warp lower), then `tcmu-obd export` of a
    config with lowers {file: meta, targetFile: tar (+ gzipIndex)}: the
    exported disk is e2fsck-clean and its tree equals the merged model."""
    tmp = str(tmp_path)
    svc = write(tmp_path / "svc.json", b"{}")
    model = Model()
    l1 = layer1() + extra_files()
    l2 = layer2() + [E("big/odd", R, os.urandom(777_777)), E("big/.wh.sparse", R)]
    tar1 = write(tmp_path / "l1.tar", tar_bytes(l1))
    t2 = tar_bytes(l2)
    tar2 = write(tmp_path / "l2.tar", t2)
    gz2 = write(tmp_path / "l2.tar.gz", gzip.compress(t2, mtime=0))

    cfg1, up1 = warp_config(tmp, "w1", tar1)
    run("create", "--turboOCI", "--mkfs", up1["data"], up1["index"], 1)
    run("turbo_apply", tar1, cfg1, "--service_config_path", svc, "--gz_index_path", tmp_path / "unused")
    assert not (tmp_path / "unused").exists()          # a plain tar has no gzip index
    meta1 = str(tmp_path / "l1.meta")
    run("commit", up1["data"], up1["index"], meta1, "-z", "--turboOCI")
    model.apply(l1)

    lower1 = {"file": meta1, "targetFile": tar1}
    cfg2 = os.path.join(tmp, "w2.json")
    up2 = {"data": os.path.join(tmp, "w2.fsmeta"), "index": os.path.join(tmp, "w2.index"), "target": gz2}
    with open(cfg2, "w") as f:
        json.dump({"lowers": [lower1], "upper": up2}, f)
    run("create", "--turboOCI", up2["data"], up2["index"], 1)
    gzmeta = str(tmp_path / "l2.gzip.meta")
    run("turbo_apply", gz2, cfg2, "--service_config_path", svc, "--gz_index_path", gzmeta)
    meta2 = str(tmp_path / "l2.meta")
    run("commit", up2["data"], up2["index"], meta2, "-z", "-t", "--turboOCI")
    model.apply(l2)

    cfg = os.path.join(tmp, "image.json")
    with open(cfg, "w") as f:
        json.dump({"lowers": [lower1, {"file": meta2, "targetFile": gz2, "gzipIndex": gzmeta}],
                   "resultFile": os.path.join(tmp, "result")}, f)
    raw = str(tmp_path / "disk.raw")
    run("main", "export", cfg, raw)
    fsck = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    with blockdev.raw_loop(raw) as dev, apply.mounted(dev, os.path.join(tmp, "ro"), read_only=True) as mnt:
        assert compare(model, mnt) > 40
