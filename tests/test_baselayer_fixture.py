"""The bundled overlaybd base layer: shipped byte for byte, read exactly,
and its exported 64 GiB disk passes e2fsck."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from tcmu_obd.image import baselayer
from tcmu_obd.format import ext4
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer


def test_bundled_base_layer_is_the_real_file(bundled_base):
    data = open(bundled_base, "rb").read()
    assert len(data) == baselayer.SIZE
    assert hashlib.sha256(data).hexdigest() == baselayer.SHA256
    assert os.path.exists(os.path.join(os.path.dirname(bundled_base), "ext4_64.NOTICE"))


def test_base_layer_fields(bundled_base):
    with open_layer(bundled_base) as layer:
        assert layer.wrappers == ["zfile"]
        assert layer.trailer.uuid == baselayer.UUID
        assert layer.trailer.parent_uuid == "00000000-0000-0000-0000-000000000000"
        assert layer.virtual_size == 64 << 30
        assert layer.trailer.index_size == 8448          # 8323 real + 125 padding
        assert len(layer.index) == 8323
        assert layer.zinfo.block_size == 4096 and layer.zinfo.algo == 1 and layer.zinfo.verify


def test_base_layer_superblock(bundled_base):
    image = Image([open_layer(bundled_base)])
    try:
        assert image.virtual_size == 68719476736
        assert image.pread(1080, 2) == b"\x53\xef"
        sb = ext4.superblock(image.pread)
        assert sb["block_size"] == 4096 and sb["size_bytes"] == 64 << 30
        image.upper  # read-only
        assert not image.writable
    finally:
        image.close()


@pytest.mark.skipif(shutil.which("e2fsck") is None, reason="e2fsprogs is installed by scripts/setup.sh")
def test_base_layer_exports_to_a_clean_ext4(bundled_base, tmp_path):
    out = tmp_path / "disk.raw"
    subprocess.run([sys.executable, "-m", "tcmu_obd.cli.main", "export", bundled_base, str(out)],
                   check=True)
    st = os.stat(out)
    assert st.st_size == 64 << 30
    assert st.st_blocks * 512 < 1 << 30           # holes stayed holes
    r = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in r.stdout or "files" in r.stdout
