"""The drop-in tools, run as a user would: overlaybd-create, -commit, -zfile,
-merge and tcmu-obd info/export/read, through their console entry points."""
import json
import os
import subprocess
import sys

import pytest

from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer

TOOLS = {"overlaybd-create": "create", "overlaybd-commit": "commit", "overlaybd-zfile": "zfile",
         "overlaybd-merge": "merge", "tcmu-obd": "main"}


def tool(name, *args, check=True, stdin=None):
    code = f"import sys; from tcmu_obd.cli.{TOOLS[name]} import main; sys.argv[0] = {name!r}; main()"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                       input=stdin)
    if check and r.returncode != 0:
        raise AssertionError(f"{name} {args} failed: {r.stderr.decode()}")
    return r


@pytest.fixture
def rw(tmp_path):
    d, i = tmp_path / "data", tmp_path / "index"
    tool("overlaybd-create", d, i, 1)
    up = RWLayer.open(d, i)
    payload = os.urandom(3 << 20)
    up.write(payload, 1 << 20)
    up.discard(2 << 20, 4096)
    up.close()
    model = bytearray(4 << 20)
    model[1 << 20:4 << 20] = payload
    model[2 << 20:(2 << 20) + 4096] = bytes(4096)
    return d, i, bytes(model)


def read_all(path, n):
    with Image([open_layer(path)]) as image:
        return image.read(0, n)


@pytest.mark.parametrize("flags", [[], ["-z"], ["-z", "-t"], ["-z", "--algorithm", "zstd", "--bs", "64"],
                                   ["-z", "--compress_threads", "2", "--bs", "16"]])
def test_commit_outputs_read_back(rw, tmp_path, flags):
    d, i, model = rw
    out = tmp_path / "out"
    tool("overlaybd-commit", *flags, "-m", "hello", d, i, out)
    assert read_all(out, len(model)) == model
    info = json.loads(tool("tcmu-obd", "info", "--json", out).stdout)
    assert info["user_tag"] == "hello"
    assert info["wrappers"] == (["tar"] if "-t" in flags else []) + (["zfile"] if "-z" in flags else [])


def test_commit_refuses_existing_output_unless_forced(rw, tmp_path):
    d, i, model = rw
    out = tmp_path / "out"
    out.write_bytes(b"keep")
    r = tool("overlaybd-commit", d, i, out, check=False)
    assert r.returncode != 0 and b"exists" in r.stderr
    assert out.read_bytes() == b"keep"
    tool("overlaybd-commit", "-f", d, i, out)
    assert read_all(out, len(model)) == model


def test_seal_then_commit_sealed(rw, tmp_path):
    d, i, model = rw
    tool("overlaybd-commit", "--seal", d, i)
    assert read_all(d, len(model)) == model          # the sealed file is itself a layer
    out = tmp_path / "c"
    tool("overlaybd-commit", "--commit_sealed", "-z", d, out)
    assert read_all(out, len(model)) == model


def test_sparse_layer_commit(tmp_path):
    d, i = tmp_path / "d", tmp_path / "i"
    tool("overlaybd-create", "-s", d, i, 1)
    assert os.path.getsize(i) == 0                   # overlaybd leaves it empty
    up = RWLayer.open(d, i)
    up.write(b"s" * 8192, 8192)
    up.close()
    out = tmp_path / "c"
    tool("overlaybd-commit", d, i, out)
    assert read_all(out, 24576) == bytes(8192) + b"s" * 8192 + bytes(8192)


def test_zfile_tool_roundtrip_verify_and_tar(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(100000) + b"z" * 100000)
    tool("overlaybd-zfile", src, tmp_path / "z")
    assert b"is a valid zfile blob" in tool("overlaybd-zfile", "--verify", tmp_path / "z").stdout
    tool("overlaybd-zfile", "-x", tmp_path / "z", tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == src.read_bytes()
    assert oct(os.stat(tmp_path / "x").st_mode & 0o777) == "0o700"
    tool("overlaybd-zfile", "-t", "--algorithm", "zstd", "--bs", "8", src, tmp_path / "zt")
    tool("overlaybd-zfile", "-x", "-t", tmp_path / "zt", tmp_path / "xt")
    assert (tmp_path / "xt").read_bytes() == src.read_bytes()
    # pipe mode: one path means read stdin
    tool("overlaybd-zfile", tmp_path / "zp", stdin=src.read_bytes())
    tool("overlaybd-zfile", "-x", tmp_path / "zp", tmp_path / "xp")
    assert (tmp_path / "xp").read_bytes() == src.read_bytes()


def test_zfile_verify_reports_the_bad_block(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(20000))
    tool("overlaybd-zfile", src, tmp_path / "z")
    raw = bytearray((tmp_path / "z").read_bytes())
    raw[600] ^= 0xFF                                  # inside block 0's payload
    (tmp_path / "z").write_bytes(raw)
    r = tool("overlaybd-zfile", "--verify", tmp_path / "z", check=False)
    assert r.returncode != 0
    assert b"zfile block 0 crc" in r.stderr and str(tmp_path / "z").encode() in r.stderr


@pytest.mark.parametrize("args", [["--bs", "3"], ["--algorithm", "lzo"]])
def test_zfile_tool_rejects_bad_options(tmp_path, args):
    src = tmp_path / "src"
    src.write_bytes(b"x")
    r = tool("overlaybd-zfile", *args, src, tmp_path / "z", check=False)
    assert r.returncode != 0 and r.stderr.startswith(b"error:")


def test_merge_tool_and_export_and_read(tmp_path, bundled_base):
    d, i = tmp_path / "d", tmp_path / "i"
    tool("overlaybd-create", d, i, 0)
    up = RWLayer.open(d, i)
    up.write(b"Q" * 4096, 1 << 20)
    up.close()
    tool("overlaybd-commit", "-z", "-t", d, i, tmp_path / "l1")
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps({"lowers": [{"file": bundled_base}, {"file": str(tmp_path / "l1")}],
                               "resultFile": str(tmp_path / "result")}))
    assert tool("tcmu-obd", "read", cfg, (1 << 20) + 10, 5).stdout == b"QQQQQ"
    assert tool("tcmu-obd", "read", cfg, 1080, 2).stdout == b"\x53\xef"
    assert (tmp_path / "result").read_text() == "success"
    tool("overlaybd-merge", cfg, tmp_path / "merged")
    with Image([open_layer(tmp_path / "merged")]) as merged, \
            Image([open_layer(bundled_base), open_layer(tmp_path / "l1")]) as stack:
        assert merged.virtual_size == stack.virtual_size == 64 << 30
        assert merged.read(0, 4 << 20) == stack.read(0, 4 << 20)
        # same extents and kinds (merging may join records of one source layer)
        def extents(records):
            out = []
            for off, length, _m, zeroed, _t in records:
                if out and out[-1][2] == zeroed and out[-1][0] + out[-1][1] == off:
                    out[-1] = (out[-1][0], out[-1][1] + length, zeroed)
                else:
                    out.append((off, length, zeroed))
            return out
        assert extents(merged.effective_records()) == extents(stack.effective_records())


def test_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps({"lowers": [{"file": 7}]}))
    r = tool("tcmu-obd", "read", cfg, 0, 512, check=False)
    assert r.returncode != 0 and b"lowers[0].file" in r.stderr
    cfg.write_text(json.dumps({"lowers": [{"dir": str(tmp_path / "nope")}],
                               "resultFile": str(tmp_path / "res")}))
    r = tool("tcmu-obd", "read", cfg, 0, 512, check=False)
    assert r.returncode != 0 and b"lowers[0]" in r.stderr
    assert (tmp_path / "res").read_text().startswith("failed:")


def test_demo_shows_the_base_layer():
    out = tool("tcmu-obd", "demo").stdout.decode()
    assert "68719476736 bytes" in out and "0xEF53" in out and "C02FB491" in out
