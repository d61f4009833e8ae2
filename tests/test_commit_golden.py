"""Golden tests for commit output, written by hand from docs/formats.md (LSMT header
and trailer block, LSMT index records, Commit and merge): every expected byte is laid out here field by field, independently
of the module's own packers."""
import os
import struct

from conftest import commit_layer, make_layer, merge_layers
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer

MAGIC = bytes.fromhex("4C534D5400010200") + bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")
NULL = b"00000000-0000-0000-0000-000000000000\0"
INVALID = bytes.fromhex("FFFFFFFFFFFF0300") + bytes(8)


def block(flags, ioff, isize, vsize, uuid=NULL, parent=NULL, tag=b""):
    b = (MAGIC + struct.pack("<I", 390) + struct.pack("<I", flags) + struct.pack("<Q", ioff)
         + struct.pack("<Q", isize) + struct.pack("<Q", vsize) + uuid + parent
         + b"\0\0" + b"\x01" + b"\x01" + tag.ljust(256, b"\0"))
    assert len(b) == 390
    return b + bytes(4096 - 390)


def rec(offset, length, moffset, zeroed=0, tag=0):
    return struct.pack("<Q", offset | length << 50) + struct.pack("<Q", moffset | zeroed << 55 | tag << 56)


def test_commit_golden_bytes(tmp_path):
    vsize = 1 << 20
    up = RWLayer.create(tmp_path / "d", tmp_path / "i", vsize)
    up.write(b"A" * 512, 2 * 512)
    up.write(b"B" * 40960, 100 * 512)          # 80 sectors: steps of 64 + 16
    up.discard(300 * 512, 10 * 512)
    out = commit_layer(up, tmp_path / "c", tag=b"golden")
    up.close()
    # steps: (2,1,mo 8) (100,64,mo 9) (164,16,mo 73) zeroed (300,10,mo 89)
    # merged: (2,1,8) (100,80,9) (300,10,89 zeroed); 253 padding records
    index = rec(2, 1, 8) + rec(100, 80, 9) + rec(300, 10, 89, 1) + INVALID * 253
    expect = (block(0x07, 0, 0, vsize, tag=b"golden") + b"A" * 512 + b"B" * 40960 + index
              + block(0x06, 89 * 512, 256, vsize, tag=b"golden"))
    assert open(out, "rb").read() == expect


def test_commit_merge_rule_is_strictly_less(tmp_path):
    up = RWLayer.create(tmp_path / "d", tmp_path / "i", 16 << 20)
    up.write(os.urandom(8192 * 512), 0)            # one record of 8192 sectors
    up.write(os.urandom(8191 * 512), 8192 * 512)   # then 8191: 127 steps of 64 and one of 63
    out = commit_layer(up, tmp_path / "c")
    up.close()
    with open_layer(out) as layer:
        # 8192 + 127*64 = 16320; adding 63 gives 16383, which is not < 16383
        assert layer.index.records() == [(0, 16320, 8, 0, 0), (16320, 63, 16328, 0, 0)]


def test_commit_merges_adjacent_zeroed_records(tmp_path):
    up = RWLayer.create(tmp_path / "d", tmp_path / "i", 64 << 20)
    up.discard(0, 100 * 512)
    up.discard(100 * 512, 100 * 512)
    up.discard(1000 * 512, 20000 * 512)            # split into 16383 + 3617 by discard
    out = commit_layer(up, tmp_path / "c")
    up.close()
    with open_layer(out) as layer:
        assert layer.index.records() == [(0, 200, 8, 1, 0), (1000, 16383, 8, 1, 0),
                                         (17383, 3617, 8, 1, 0)]


def test_commit_uuid_parent_and_null_forms(tmp_path):
    up = RWLayer.create(tmp_path / "d", tmp_path / "i", 1 << 20,
                        parent_uuid="c02fb491-b4d4-4904-8684-a014d032af78")
    up.write(b"x" * 512, 0)
    out = commit_layer(up, tmp_path / "c", uuid="abcdef01-2345-6789-abcd-ef0123456789")
    out2 = commit_layer(up, tmp_path / "c2", uuid="not-a-uuid", parent="bad")
    up.close()
    raw = open(out, "rb").read()
    assert raw[56:93] == b"ABCDEF01-2345-6789-ABCD-EF0123456789\0"
    assert raw[93:130] == b"C02FB491-B4D4-4904-8684-A014D032AF78\0"   # parent from the data header
    raw2 = open(out2, "rb").read()
    assert raw2[56:93] == NULL
    assert raw2[93:130] == b"C02FB491-B4D4-4904-8684-A014D032AF78\0"


def test_merge_keeps_source_tags(tmp_path):
    low = make_layer(str(tmp_path), "low", [(0, b"L" * 4096)])
    top = make_layer(str(tmp_path), "top", [(4096, b"T" * 4096), (0, 1024, "discard")])
    out = merge_layers([low, top], tmp_path / "m")
    data = open(out, "rb").read()
    ioff = struct.unpack_from("<Q", data, len(data) - 4096 + 32)[0]
    # merged index, top-first tags: top zeroed [0,2), low data [2,8), top data [8,16)
    assert data[ioff:ioff + 48] == (rec(0, 2, 8, 1, 0) + rec(2, 6, 8, 0, 1) + rec(8, 8, 14, 0, 0))
    with open_layer(out) as layer:               # readers force the tag back to 0
        assert [r[4] for r in layer.index.records()] == [0, 0, 0]


def test_commit_golden_turbooci_warp(tmp_path):
    """overlaybd-commit --turboOCI of a warp layer built by hand: tag-0 data
    copied from fsmeta in 64-sector steps and re-mapped, tag-1 records kept
    verbatim, neighbours merged only with the same tag and contiguous offset
    and moffset, no zeroed records; header and trailer of a sealed data file."""
    from tcmu_obd.cli import commit as commit_cli
    from tcmu_obd.image.warp_rw import WarpRWLayer
    vsize = 16 << 20
    w = WarpRWLayer.create(tmp_path / "fsmeta", tmp_path / "index", vsize)
    w.write(b"M" * 512, 0)                        # tag 0 (0,1)
    w.write(b"N" * 512, 1 * 512)                  # tag 0 (1,1): merges with (0,1)
    w.remote_map(2 * 512, 3 * 512, 1024)          # tag 1 (2,3,moff 2): not merged with tag 0
    w.remote_map(5 * 512, 2 * 512, 5 * 512)       # tag 1 (5,2,moff 5): contiguous -> merged (2,5,2)
    w.remote_map(7 * 512, 1 * 512, 100 * 512)     # tag 1 (7,1,100): moffset not contiguous
    w.write(b"P" * (70 * 512), 8 * 512)           # tag 0 (8,70): steps 64 + 6, merged again
    w.remote_map(1000 * 512, 20000 * 512, 0)      # split 16383 + 3617: contiguous but too long
    w.write(b"Q" * 512, 1000 * 512)               # overwrites the first sector of that mapping
    w.discard(8 * 512, 512)                       # mapped: a tag-0 record of the punched zeros
    w.close()
    out = tmp_path / "meta.commit"
    assert commit_cli.body([str(tmp_path / "fsmeta"), str(tmp_path / "index"), str(out), "--turboOCI",
                            "-m", "warp"]) == 0
    # data area (sectors from 8): M N | zeros(1) P*69 | Q
    data = b"M" * 512 + b"N" * 512 + bytes(512) + b"P" * (69 * 512) + b"Q" * 512
    # LBA order: (0,2,8) (2,5,2,t1) (7,1,100,t1) (8,70,10) (1000,1,80) (1001,16382,1,t1) (17383,3617,16383,t1)
    index = (rec(0, 2, 8) + rec(2, 5, 2, tag=1) + rec(7, 1, 100, tag=1) + rec(8, 70, 10)
             + rec(1000, 1, 80) + rec(1001, 16382, 1, tag=1) + rec(17383, 3617, 16383, tag=1)
             + INVALID * (256 - 7))
    data_end = 4096 + len(data)
    expect = (block(0x07, 0, 0, vsize, tag=b"warp") + data + index
              + block(0x06, data_end, 256, vsize, tag=b"warp"))
    assert out.read_bytes() == expect
