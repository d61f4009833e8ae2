"""Property: whatever was at overlaybd's paths before (nothing, a foreign
overlaybd's files, an operator's overlaybd.json), install --force followed by
uninstall leaves exactly what was there before, byte for byte; install
without --force either refuses having written nothing or succeeds; a second
install changes nothing.  Also: a damaged bundled base layer is refused by
name before anything is written.  Runs tcmu_obd.build.install in process on
real files under a temporary root."""
import hashlib
import os
import pathlib
import shutil
import tempfile

import pytest
from hypothesis import given, settings, strategies as st

from tcmu_obd.build import install
from tcmu_obd.errors import InstallError
from tcmu_obd.image import baselayer

PATHS = [f"{install.BIN_DIR}/{t}" for t in install.TOOLS] + [install.BASELAYER, install.UNIT,
                                                             install.CONFIG]


def tree(root):
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in root.rglob("*")}


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(PATHS), st.binary(min_size=0, max_size=64), max_size=len(PATHS)))
def test_install_manifest_force_then_uninstall_restores_what_was_there(existing):
    with tempfile.TemporaryDirectory() as root:
        for rel, data in existing.items():
            p = os.path.join(root, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
        before = tree(root)
        foreign = [r for r in existing if r != install.CONFIG]
        if foreign:
            with pytest.raises(InstallError, match="--force"):
                install.install(root, out=lambda s: None)
            assert tree(root) == before                # refused before writing anything
        assert install.install(root, force=True, out=lambda s: None) > 0
        after = tree(root)
        assert install.install(root, out=lambda s: None) == 0
        assert tree(root) == after
        if install.CONFIG in existing:
            assert after[install.CONFIG] == existing[install.CONFIG]
        install.uninstall(root, out=lambda s: None)
        assert tree(root) == before


def test_install_manifest_damaged_baselayer_refused(tmp_path, monkeypatch):
    bad = tmp_path / "ext4_64"
    shutil.copy(baselayer.path(), bad)
    with open(bad, "r+b") as f:
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 0xFF]))
    assert hashlib.sha256(bad.read_bytes()).hexdigest() != baselayer.SHA256
    monkeypatch.setattr(baselayer, "path", lambda: str(bad))   # a real damaged copy in its place
    root = tmp_path / "root"
    with pytest.raises(InstallError, match=f"{bad}: sha256"):
        install.install(str(root), out=lambda s: None)
    assert not root.exists()
