"""tcmu_obd.build.untar on a plain directory: the same three layers and model
as tests/test_apply_untar.py (every entry kind, whiteouts, opaque
directories, hard links across layers, symlinked parents and an escape
attempt), but with no block device, mkfs, loop device or FUSE: the untar
rules are checked apart from the kernel's ext4.  Plus the root jail and the
bad-input errors of the rules themselves."""
import io
import os
import tarfile

import pytest

from tcmu_obd.build import untar
from tcmu_obd.errors import ApplyError
from test_apply_untar import D, E, H, R, S, Model, compare, layer1, layer2, layer3, tar_bytes


def unpack(entries, root, fmt=tarfile.PAX_FORMAT):
    return untar.untar(io.BytesIO(tar_bytes(entries, fmt)), str(root))


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "lost+found").mkdir(mode=0o700)       # the model starts as an empty ext4
    return r


def test_three_layers_match_the_model(root):
    model = Model()
    for entries, fmt in ((layer1(), tarfile.PAX_FORMAT), (layer2(), tarfile.PAX_FORMAT),
                         (layer3(), tarfile.GNU_FORMAT)):
        u = unpack(entries, root, fmt)
        assert u.entries == len(entries)
        model.apply(entries)
    assert compare(model, str(root)) > 40
    assert (root / "outside/pwned").is_file()           # the escape stayed inside the root
    assert not os.path.exists("/outside/pwned") and not os.path.exists("/dotdot")


def test_whiteout_spares_what_the_same_layer_unpacked(root):
    unpack([E("d", D), E("d/old", R, b"1")], root)
    unpack([E("d/new", R, b"2"), E("d/.wh..wh..opq", R), E("d/.wh.gone", R)], root)
    assert sorted(os.listdir(root / "d")) == ["new"]


def test_symlinked_parent_stays_inside_the_root(root, tmp_path):
    unpack([E("up", S, linkname="../../.."), E("up/etc/evil", R, b"x")], root)
    assert (root / "etc/evil").read_bytes() == b"x"
    assert not (tmp_path / "etc").exists()


def test_hard_link_outside_the_root_is_refused(root):
    with pytest.raises(ApplyError, match="hard link target"):
        unpack([E("h", H, linkname="../../../etc/passwd")], root)


def test_not_a_tar_and_truncated_tar_are_clear_errors(root):
    with pytest.raises(ApplyError, match="not a tar|corrupt tar|truncated tar"):
        untar.untar(io.BytesIO(b"\x01" * 700), str(root))
    good = tar_bytes([E("f", R, b"y" * 3000)])
    with pytest.raises(ApplyError, match="unexpected end of data|truncated tar"):
        untar.untar(io.BytesIO(good[:1200]), str(root))


@pytest.mark.parametrize("name", [".", "./", "/", "..", "a/.."])
@pytest.mark.parametrize("kind", [R, S, H])
def test_a_non_directory_named_as_the_root_is_refused(root, name, kind):
    """A member whose name normalizes to the root must be a directory (the
    rule the erofs writer has too): anything else is a clear error naming
    the member, and the root and what it holds are untouched."""
    (root / "keep").write_bytes(b"kept")
    with pytest.raises(ApplyError, match="the root can only be a directory"):
        unpack([E(name, kind, b"x" if kind == R else b"", linkname="keep")], root)
    assert (root / "keep").read_bytes() == b"kept" and (root / "lost+found").is_dir()
