"""TurboOCI warp lowers opened from config.v1.json (targetFile: a plain tar, or a
.tar.gz with its gzipIndex):
random tag-0 / tag-1 / zeroed records over a random target read like a
bytearray model, with ordinary layers above and below and a writable upper,
whether the meta layer is plain, ZFile- or tar-wrapped; the stored tags are
normalised; without a target the same file is an ordinary layer; and the
CLI's export and overlaybd-merge (flatten) of a warp stack equal the model."""
import gzip
import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_layer
from test_cli_tools import tool
from warp_layers import model_warp, write_warp_layer
from tcmu_obd.errors import FormatError
from tcmu_obd.format import gzindex
from tcmu_obd.image import assemble
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.stack import Image

SECTOR = 512
VSECT = 256                     # sectors of the virtual disk (128 KiB)
VSIZE = VSECT * SECTOR


@st.composite
def warp_records(draw, target_len):
    """Sorted disjoint records; tag-1 ones start inside the target (past it is an open error)."""
    tsect = -(-target_len // SECTOR)
    kinds = ["meta", "zero"] + (["target", "target"] if tsect else [])
    recs, pos = [], draw(st.integers(0, 20))
    for _ in range(draw(st.integers(0, 10))):
        ln = draw(st.integers(1, 24))
        if pos + ln > VSECT:
            break
        kind = draw(st.sampled_from(kinds))
        if kind == "meta":
            x = random.Random(draw(st.integers(0, 2**32))).randbytes(ln * SECTOR)
        elif kind == "target":
            x = draw(st.integers(0, tsect - 1))
        else:
            x = None
        recs.append((pos, ln, kind, x))
        pos += ln + draw(st.integers(0, 20))
    return recs


@st.composite
def plain_writes(draw):
    """(offset, bytes) and (offset, length, 'discard') for make_layer, all sector-aligned."""
    out = []
    for _ in range(draw(st.integers(0, 4))):
        off = draw(st.integers(0, VSECT - 1)) * SECTOR
        n = min(draw(st.integers(1, 16)) * SECTOR, VSIZE - off)
        if draw(st.integers(0, 3)) == 0:
            out.append((off, n, "discard"))
        else:
            out.append((off, random.Random(draw(st.integers(0, 2**32))).randbytes(n)))
    return out


def apply_plain(model, writes):
    for w in writes:
        if len(w) == 3:
            model[w[0]:w[0] + w[1]] = bytes(w[1])
        else:
            model[w[0]:w[0] + len(w[1])] = w[1]


def _lower(low):
    if isinstance(low, (str, os.PathLike)):
        return {"file": str(low)}
    out = {"file": str(low[0]), "targetFile": str(low[1])}
    if len(low) > 2:
        out["gzipIndex"] = str(low[2])
    return out


def warp_config(tmp, name, lowers, upper=None):
    """Write config.v1.json: lowers are paths (ordinary) or (meta, target[, gzip index]) tuples."""
    doc = {"lowers": [_lower(low) for low in lowers],
           "resultFile": os.path.join(tmp, name + ".result")}
    if upper:
        doc["upper"] = {"data": upper[0], "index": upper[1]}
    path = os.path.join(tmp, name + ".json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.data())
def test_warp_stack_reads_equal_model(tmp_path_factory, data):
    tmp = str(tmp_path_factory.mktemp("warp"))
    draw = data.draw
    tlen = draw(st.sampled_from([0, 511, 4096, 10000, 33 * SECTOR + 17]))
    target = os.urandom(tlen)
    with open(os.path.join(tmp, "layer.tar"), "wb") as f:
        f.write(target)
    recs = draw(warp_records(tlen))
    wrap = draw(st.sampled_from([(False, False), (True, False), (True, True)]))
    meta = write_warp_layer(os.path.join(tmp, "meta"), VSIZE, recs, *wrap, tag_base=draw(st.sampled_from([0, 7])))
    below, above = draw(plain_writes()), draw(plain_writes())
    lowers, model = [], bytearray(VSIZE)
    if below:
        lowers.append(make_layer(tmp, "below", below, VSIZE))
        apply_plain(model, below)
    if draw(st.booleans()):         # the same tar as a .tar.gz read through its gzip index
        with open(os.path.join(tmp, "layer.tar.gz"), "wb") as f:
            f.write(gzip.compress(target, draw(st.sampled_from([1, 6, 9]))))
        with open(os.path.join(tmp, "layer.tar.gz"), "rb") as f:
            gzindex.build_index(f, os.path.join(tmp, "gzip.meta"), span=1 << 16)
        lowers.append((meta, os.path.join(tmp, "layer.tar.gz"), os.path.join(tmp, "gzip.meta")))
    else:
        lowers.append((meta, os.path.join(tmp, "layer.tar")))
    # overlaybd's tag rule: with only tag-1 records present they all become
    # tag 0 (this file), and then point outside its (empty) data area
    only_target = bool(recs) and all(r[2] == "target" for r in recs)
    model_warp(model, recs, target)
    if above:
        lowers.append(make_layer(tmp, "above", above, VSIZE))
        apply_plain(model, above)
    upper = None
    if draw(st.booleans()):
        from tcmu_obd.image.rw import RWLayer
        upper = (os.path.join(tmp, "up.data"), os.path.join(tmp, "up.index"))
        RWLayer.create(*upper, 0).close()
    cfg = warp_config(tmp, "c", lowers, upper)
    if only_target:
        with pytest.raises(FormatError, match=r"/meta: index record 0 moffset = .*: data record .* outside"):
            assemble.open_image(cfg)
        assert open(os.path.join(tmp, "c.result")).read().startswith(f"failed:{meta}: index record 0")
        return
    with assemble.open_image(cfg) as image:
        assert open(os.path.join(tmp, "c.result")).read() == "success"
        assert image.virtual_size == VSIZE
        assert image.read(0, VSIZE) == bytes(model)
        for _ in range(3):
            s = draw(st.integers(0, VSECT - 1))
            n = draw(st.integers(0, VSECT - s))
            assert image.read(s * SECTOR, n * SECTOR) == bytes(model[s * SECTOR:(s + n) * SECTOR])
        if upper is not None:
            off = draw(st.integers(0, VSECT - 8)) * SECTOR
            image.write(b"U" * 4096, off)
            model[off:off + 4096] = b"U" * 4096
            assert image.read(0, VSIZE) == bytes(model)


def test_warp_tags_normalised_and_no_target_means_plain(tmp_path):
    """Stored tags 7/8 act as 0/1; the same meta file without targetFile is an
    ordinary layer (overlaybd's switch): its tag-1 records would read its own
    file, so when they point past its data area the open fails, with a hint."""
    target = os.urandom(8192)
    (tmp_path / "t.tar").write_bytes(target)
    recs = [(0, 2, "meta", b"m" * 1024), (4, 4, "target", 2)]
    meta = write_warp_layer(tmp_path / "meta", VSIZE, recs, tag_base=7)
    with assemble.open_image(warp_config(str(tmp_path), "w", [(meta, tmp_path / "t.tar")])) as image:
        assert image.read(0, 4096) == b"m" * 1024 + bytes(1024) + target[1024:3072]
        assert len(image.files()) == 2
    with pytest.raises(FormatError, match="index record 1 moffset = 2: .*outside the layer's data area "
                       r"\[8, 10\).*TurboOCI meta layer opened without its targetFile"):
        assemble.open_image(warp_config(str(tmp_path), "p", [meta]))
    # tag-1 records inside the meta file's data area: read from the meta file itself
    meta2 = write_warp_layer(tmp_path / "meta2", VSIZE, [(0, 4, "meta", b"n" * 2048), (4, 2, "target", 9)])
    with assemble.open_image(warp_config(str(tmp_path), "q", [meta2])) as image:
        assert len(image.files()) == 1
        assert image.read(0, 3072) == b"n" * 2048 + b"n" * 1024


def test_warp_export_and_flatten_equal_model(tmp_path):
    """tcmu-obd export and overlaybd-merge of [base, warp, plain] equal the
    model; the merged layer keeps the virtual size (overlaybd's merge writes
    0 there) and opens as an ordinary layer."""
    target = os.urandom(20000)
    (tmp_path / "t.tar").write_bytes(target)
    recs = [(0, 8, "meta", os.urandom(4096)), (8, 16, "target", 1), (30, 10, "target", 36),
            (40, 2, "zero", None), (100, 3, "target", 0)]
    meta = write_warp_layer(tmp_path / "meta", VSIZE, recs, use_zfile=True, use_tar=True)
    below = make_layer(str(tmp_path), "below", [(0, b"b" * VSIZE)], VSIZE)
    above = make_layer(str(tmp_path), "above", [(12 * SECTOR, b"a" * 1024)], VSIZE)
    model = bytearray(b"b" * VSIZE)
    model_warp(model, recs, target)
    model[12 * SECTOR:13 * SECTOR + 512] = b"a" * 1024
    cfg = warp_config(str(tmp_path), "c", [below, (meta, tmp_path / "t.tar"), above])
    tool("tcmu-obd", "export", cfg, tmp_path / "disk.img")
    assert (tmp_path / "disk.img").read_bytes() == bytes(model)
    assert tool("tcmu-obd", "read", cfg, 30 * SECTOR + 100, 600).stdout == bytes(model[30 * SECTOR + 100:][:600])
    tool("overlaybd-merge", cfg, tmp_path / "merged")
    with Image([open_layer(tmp_path / "merged")]) as merged:
        assert merged.virtual_size == VSIZE
        assert merged.read(0, VSIZE) == bytes(model)


def test_warp_trace_records_meta_reads_only(tmp_path):
    """A trace records reads of a warp layer's meta file (as overlaybd, whose
    prefetcher wraps the meta file), not of its target; layer indexes stay
    positions in lowers whatever file numbers targets take."""
    from tcmu_obd.remote import prefetch
    (tmp_path / "t.tar").write_bytes(os.urandom(8192))
    meta = write_warp_layer(tmp_path / "meta", VSIZE, [(0, 2, "meta", b"m" * 1024), (4, 4, "target", 2)])
    above = make_layer(str(tmp_path), "above", [(64 * SECTOR, b"a" * 1024)], VSIZE)
    cfg = warp_config(str(tmp_path), "c", [(meta, tmp_path / "t.tar"), above])
    with assemble.open_image(cfg) as image:
        assert image.file_layer == [(1, 0), (0, 0), (0, 1)]
        assert prefetch.layer_reads(image, 0, 8 * SECTOR) == [(0, 8 * SECTOR, 1024)]
        assert prefetch.layer_reads(image, 4 * SECTOR, 4 * SECTOR) == []
        (li, _off, n), = prefetch.layer_reads(image, 64 * SECTOR, 1024)
        assert (li, n) == (1, 1024)
