"""A TurboOCI warp stack served by the FUSE frontend (`tcmu-obd mount`, a
separate process opening the config through assemble.open_image): the disk
file reads like the model, including the zero-filled piece past the tar's
end and the .tar.gz target read through its gzip index."""
import gzip
import json
import os

from test_fuse_frontend import assert_gone, cli, mounted_pid, pytestmark, tmp  # noqa: F401 - fixture and skip
from warp_layers import model_warp, write_warp_layer
from tcmu_obd.format import gzindex

SECTOR = 512
VSIZE = 4 << 20


def test_warp_fuse_mount_reads_model(tmp):
    target = os.urandom(300000)
    (tmp / "layer.tar").write_bytes(target)
    (tmp / "layer.tar.gz").write_bytes(gzip.compress(target))
    with open(tmp / "layer.tar.gz", "rb") as f:
        gzindex.build_index(f, tmp / "gzip.meta", span=1 << 16)
    recs = [(0, 8, "meta", os.urandom(4096)), (8, 400, "target", 1), (1000, 20, "target", 300000 // SECTOR - 2),
            (2000, 8, "zero", None)]
    meta = write_warp_layer(tmp / "meta", VSIZE, recs, use_zfile=True)
    model = bytes(model_warp(bytearray(VSIZE), recs, target))
    for name, lower in (("plain", {"targetFile": str(tmp / "layer.tar")}),
                        ("gz", {"targetFile": str(tmp / "layer.tar.gz"), "gzipIndex": str(tmp / "gzip.meta")})):
        cfg = tmp / f"{name}.json"
        cfg.write_text(json.dumps({"lowers": [{"file": meta, **lower}]}))
        mnt = tmp / f"mnt-{name}"
        mnt.mkdir()
        cli("mount", cfg, mnt)
        pid = mounted_pid(mnt)
        try:
            with open(mnt / "disk", "rb") as f:
                assert os.fstat(f.fileno()).st_size == VSIZE
                assert f.read() == model
                assert os.pread(f.fileno(), 5000, 1000 * SECTOR + 700) == model[1000 * SECTOR + 700:][:5000]
        finally:
            cli("umount", mnt)
        assert_gone(tmp, mnt, pid)
