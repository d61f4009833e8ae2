"""The writable TurboOCI warp layer (tcmu_obd.image.warp_rw) and its commit
(overlaybd-commit --turboOCI): random writes, tar mappings and discards
against a bytearray model, read through an Image (the core Stack with a warp
upper), after reopening (index replay), and after commit -z / -t, with the
committed meta layer read with its target; plus the tools and bad input."""
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tcmu_obd import core
from tcmu_obd.cli import commit as commit_cli
from tcmu_obd.errors import FormatError, UsageError
from tcmu_obd.format import lsmt
from tcmu_obd.image.layer import unwrap
from tcmu_obd.image.stack import Image
from tcmu_obd.image.warp_rw import WarpRWLayer

S = 512
VSIZE = 4 << 20                 # 8192 sectors
TARGET = 10 << 20           # 20480 sectors: every mapping below stays inside


def tool(name, *args, check=True):
    mod = {"overlaybd-create": "create", "overlaybd-commit": "commit"}[name]
    code = f"import sys; from tcmu_obd.cli.{mod} import main; sys.argv[0] = {name!r}; main()"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{name} {args} failed: {r.stderr.decode()}")
    return r


def read_committed(path, target_path):
    """A committed warp meta layer read with its target, without the
    stack's lower loader: header/trailer/index parsed here, tag 0 -> the
    layer, tag 1 -> the target (as docs/formats.md says)."""
    fd = os.open(path, os.O_RDONLY)
    backing = unwrap(fd, path)[0]
    size = backing.size
    trailer = lsmt.LsmtHeader.unpack(backing.pread(size - 4096, 4096), path, "trailer")
    assert trailer.is_sealed and trailer.is_data and not trailer.is_header
    raw = backing.pread(trailer.index_offset, trailer.index_size * 16)
    index = core.Index.from_raw(raw, keep_tags=True)
    tfd = os.open(target_path, os.O_RDONLY)
    tgt = core.RawBacking(tfd, 0, os.fstat(tfd).st_size, target_path)
    stack = core.Stack([backing, tgt], index)
    return stack, index, trailer, (fd, tfd)


ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 8191), st.integers(1, 40)),
    st.tuples(st.just("r"), st.integers(0, 8191), st.integers(1, 40000), st.integers(0, 12000)),
    st.tuples(st.just("d"), st.integers(0, 8191), st.integers(1, 300)),
), max_size=25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, seed=st.integers(0, 1 << 30))
def test_turbo_warp_rw_matches_model_through_commit(tmp_path_factory, ops, seed):
    tmp = tmp_path_factory.mktemp("w")
    rnd = __import__("random").Random(seed)
    target = rnd.randbytes(TARGET)
    tpath = tmp / "layer.tar"
    tpath.write_bytes(target)
    model = bytearray(VSIZE)
    w = WarpRWLayer.create(tmp / "meta", tmp / "idx", VSIZE, target_path=str(tpath))
    for op in ops:
        if op[0] == "w":
            s, n = op[1], min(op[2], 8192 - op[1])
            data = rnd.randbytes(n * S)
            w.write(data, s * S)
            model[s * S:(s + n) * S] = data
        elif op[0] == "r":
            s, n, m = op[1], min(op[2], 8192 - op[1]), op[3]
            w.remote_map(s * S, n * S, m * S)
            model[s * S:(s + n) * S] = target[m * S:(m + n) * S]
        else:
            s, n = op[1], min(op[2], 8192 - op[1])
            # a discard reads zeros where the layer maps something (it has no lowers here)
            w.discard(s * S, n * S)
            model[s * S:(s + n) * S] = bytes(n * S)
    assert all(r[1] <= 16383 and r[4] in (0, 1) for r in w.records())
    assert Image([], w).read(0, VSIZE) == bytes(model)
    w.close()
    w = WarpRWLayer.open(tmp / "meta", tmp / "idx", str(tpath))
    assert Image([], w).read(0, VSIZE) == bytes(model)
    w.close()
    for extra in ([], ["-z"], ["-z", "--algorithm", "zstd", "--bs", "16", "-t"]):
        out = tmp / f"commit{len(extra)}"
        assert commit_cli.body([str(tmp / "meta"), str(tmp / "idx"), str(out), "--turboOCI", *extra, "-f"]) == 0
        stack, index, trailer, fds = read_committed(str(out), str(tpath))
        try:
            assert stack.read(0, VSIZE) == bytes(model)
            assert trailer.virtual_size == VSIZE
            assert not any(r[3] for r in index.records())      # no zeroed records (as overlaybd)
        finally:
            for fd in fds:
                os.close(fd)


def test_turbo_warp_remote_map_splits_at_16383(tmp_path):
    w = WarpRWLayer.create(tmp_path / "m", tmp_path / "i", 64 << 20)
    w.remote_map(4096, 40000 * S, 1024)
    assert w.records() == [(8, 16383, 2, 0, 1), (16391, 16383, 16385, 0, 1), (32774, 7234, 32768, 0, 1)]
    raw = (tmp_path / "i").read_bytes()[4096:]
    assert raw[:16] == struct.pack("<QQ", 8 | 16383 << 50, 2 | 1 << 56)
    # no target: tag-1 data reads as zeros
    assert Image([], w).read(4096, 4096) == bytes(4096)
    w.close()


def test_turbo_create_tool_layout(tmp_path):
    d, i = tmp_path / "fsmeta", tmp_path / "index"
    tool("overlaybd-create", "--turboOCI", "-s", d, i, 2)
    st_ = os.stat(d)
    assert st_.st_size == 2 << 30 and st_.st_blocks == 0          # sparse, vsize bytes, no header
    raw = i.read_bytes()
    assert len(raw) == 4096
    h = lsmt.LsmtHeader.unpack(raw, str(i))
    assert h.is_header and not h.is_data and not h.is_sealed
    assert h.index_offset == 4096 and h.index_size == 0 and h.virtual_size == 2 << 30
    r = tool("overlaybd-create", "--fastoci", d, i, 2, check=False)     # O_EXCL
    assert r.returncode != 0 and str(i).encode() in r.stderr


def test_turbo_bad_input(tmp_path):
    w = WarpRWLayer.create(tmp_path / "m", tmp_path / "i", 1 << 20)
    with pytest.raises(UsageError, match="not 512-byte aligned"):
        w.write(b"x" * 100, 0)
    with pytest.raises(UsageError, match="past the warp layer's virtual size"):
        w.remote_map((1 << 20) - 512, 1024, 0)
    with pytest.raises(UsageError, match="target offset 100"):
        w.remote_map(0, 512, 100)
    w.close()
    # an index record with tag 2, and a tag-0 record that is not identity
    for rec, what in ((struct.pack("<QQ", 0 | 1 << 50, 0 | 2 << 56), "tag"),
                      (struct.pack("<QQ", 0 | 1 << 50, 5), "moffset")):
        with open(tmp_path / "i", "r+b") as f:
            f.truncate(4096)
            f.seek(4096)
            f.write(rec)
        with pytest.raises(FormatError, match=f"index record 0 {what}") as e:
            WarpRWLayer.open(tmp_path / "m", tmp_path / "i")
        assert str(tmp_path / "i") in str(e.value)
    # fsmeta shorter than vsize
    (tmp_path / "i").write_bytes((tmp_path / "i").read_bytes()[:4096])
    os.truncate(tmp_path / "m", 4096)
    with pytest.raises(FormatError, match="smaller than the warp layer's virtual_size"):
        WarpRWLayer.open(tmp_path / "m", tmp_path / "i")
    # a plain RW layer given to the warp commit: its data file is no fsmeta
    tool("overlaybd-create", tmp_path / "d2", tmp_path / "i2", 1)
    r = tool("overlaybd-commit", tmp_path / "d2", tmp_path / "i2", tmp_path / "o", "--turboOCI", check=False)
    assert r.returncode != 0 and b"smaller than the warp layer's virtual_size" in r.stderr
    assert not (tmp_path / "o").exists()
