"""Bad gzip index files and bad gzip blobs give clear errors naming the file,
the field and the value, never a crash, a hang or wrong data: every header
check overlaybd makes (and ours) one by one on a valid index with one field
changed and the crc fixed up, entry-table and window damage, a hostile
index_num, and at read time a truncated blob, a damaged blob and an index
made for another blob.
"""
import gzip
import io
import os
import random
import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from tcmu_obd.core import _lsmt as C
from tcmu_obd.core import crc32c
from tcmu_obd.core import reference as R
from tcmu_obd.errors import CorruptDataError, FormatError, ReadError
from tcmu_obd.format import gzindex

_rng = random.Random(1)
DATA = b"".join(_rng.choice([b"abc ", b"defg\n", b"%d " % _rng.randrange(10 ** 6)]) for _ in range(300000))
GZ = gzip.compress(DATA, 6, mtime=0)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    p = tmp_path_factory.mktemp("gzbad") / "good.gzidx"
    gzindex.build_index(io.BytesIO(GZ), p, span=65536)
    return p.read_bytes()


def patch(data, off, fmt, value, fix_crc=True):
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    if fix_crc:
        struct.pack_into("<I", b, 329, crc32c(bytes(b[:329]), 0))
    return bytes(b)


def fails(data, field, **kw):
    with pytest.raises(FormatError) as e:
        gzindex.parse_index(data, path="layer.gzidx", **kw)
    assert e.value.path == "layer.gzidx"
    assert e.value.field == field, str(e.value)
    return e.value


def test_good_index_parses(good):
    idx = gzindex.parse_index(good, path="p", gzip_size=len(GZ))
    assert idx.uncompress_file_size == len(DATA) and len(idx.entries) > 3
    assert idx.span == 65536 and idx.window == 32768 and idx.index_size == 29


HEADER_CASES = [
    # (offset, struct format, value, field named)
    (8, "<B", 2, "major_version"),
    (21, "<i", 28, "index_size"),
    (0, "<7s", b"ddgzidy", "magic"),
    (13, "<i", 65535, "span"),
    (17, "<i", 65536, "window"),
    (10, "<B", 2, "dict_compress_algo"),
    (49, "<q", -1, "uncompress_file_size"),
    (25, "<q", 0, "index_num"),
    (25, "<q", 1 << 40, "index_num"),
]


@pytest.mark.parametrize("off,fmt,value,field", HEADER_CASES)
def test_each_header_field_is_checked(good, off, fmt, value, field):
    err = fails(patch(good, off, fmt, value), field)
    assert str(value if not isinstance(value, bytes) else "") in str(err) or isinstance(value, bytes)


def test_size_fields(good):
    fails(good[:332], "file size")
    fails(good + b"\0", "index_file_size")
    fails(patch(good, 41, "<q", len(good) + 1), "index_file_size")
    # index_start moved: index_start + index_area_len != size
    start, = struct.unpack_from("<q", good, 313)
    fails(patch(good, 313, "<q", start - 1), "index_start")
    fails(patch(good, 321, "<q", 5), "index_start")


def test_crc(good):
    b = bytearray(good)
    b[60] ^= 1                                          # in the reserved bytes
    err = fails(bytes(b), "crc")
    assert "0x" in str(err)


def test_gzip_size_must_match(good):
    err = fails(good, "gzip_file_size", gzip_size=len(GZ) + 1)
    assert err.value == len(GZ)


def _with_table(good, entries, algo_raw=False):
    """The good file with its entry table replaced (header fixed up)."""
    start, = struct.unpack_from("<q", good, 313)
    table = b"".join(struct.pack("<qqqBI", *e) for e in entries)
    area = table if algo_raw else zlib.compress(table, 6)
    b = bytearray(good[:start] + area)
    struct.pack_into("<q", b, 25, len(entries))
    struct.pack_into("<q", b, 41, len(b))
    struct.pack_into("<q", b, 321, len(area))
    struct.pack_into("<I", b, 329, crc32c(bytes(b[:329]), 0))
    return bytes(b)


def test_entry_checks(good):
    idx = gzindex.parse_index(good)
    es = [tuple(e) for e in idx.entries]

    def bad(i, k, v):
        e = list(es)
        e[i] = e[i][:k] + (v,) + e[i][k + 1:]
        return _with_table(good, e)

    assert gzindex.parse_index(_with_table(good, es)).entries == idx.entries
    fails(bad(0, 0, 5), "entry 0 de_pos")
    fails(bad(2, 0, es[1][0] - 1), "entry 2 de_pos")
    fails(bad(2, 0, len(DATA) + 1), "entry 2 de_pos")
    fails(bad(1, 1, len(GZ) + 1), "entry 1 en_pos")
    fails(bad(2, 1, es[1][1] - 1), "entry 2 en_pos")
    fails(bad(1, 3, 8), "entry 1 bits")
    fails(bad(1, 2, 100), "entry 1 win_pos")
    fails(bad(1, 4, 1 << 30), "entry 1 win_pos")
    fails(bad(1, 4, 0), "entry 1 win_len")
    fails(bad(1, 4, es[1][4] - 1), "entry 1 window")       # the window no longer inflates to 32 KiB


def test_table_damage(good):
    start, = struct.unpack_from("<q", good, 313)
    b = bytearray(good)
    b[start + 5] ^= 0xFF
    fails(bytes(b), "index_area_len")
    # more entries claimed than the table holds
    fails(patch(good, 25, "<q", len(gzindex.parse_index(good).entries) + 1), "index_area_len")


def test_window_damage(good):
    idx = gzindex.parse_index(good)
    e = idx.entries[2]
    b = bytearray(good)
    b[e.win_pos + e.win_len // 2] ^= 0x55
    err = fails(bytes(b), "entry 2 window")
    assert err.value == e.win_pos


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_damage_never_crashes(good, data):
    b = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        struct.pack_into("<I", b, 329, crc32c(bytes(b[:329]), 0))
    try:
        idx = gzindex.parse_index(bytes(b), path="x")
    except FormatError:
        return
    assert idx.entries[0].de_pos == 0


# ---------------------------------------------------------------- read time

def _backing(M, tmp_path, gz, index, name="blob.gz"):
    p = tmp_path / f"{M.__name__.split('.')[-1]}-{len(gz)}.gz"
    p.write_bytes(gz)
    fd = os.open(p, os.O_RDONLY)
    return fd, gzindex.open_backing(M.RawBacking(fd, 0, len(gz), name), index, name + "[gzip]", impl=M)


@pytest.mark.parametrize("M", [C, R])
def test_truncated_blob_with_forced_size(M, tmp_path, good):
    # an index whose gzip_file_size was made to match a truncated blob
    cut = len(GZ) * 2 // 3
    idx = gzindex.parse_index(good)
    last = max(e.en_pos for e in idx.entries if e.en_pos <= cut)
    idx.gzip_file_size = cut
    idx.entries = [e for e in idx.entries if e.en_pos <= last]
    fd, g = _backing(M, tmp_path, GZ[:cut], idx)
    try:
        with pytest.raises(CorruptDataError) as e:
            g.pread(len(DATA) - 100, 100)
        assert "blob.gz[gzip]" in str(e.value) and "truncated" in str(e.value)
        assert e.value.field.startswith("gzip stream from access point")
        assert g.pread(0, 1000) == DATA[:1000]
    finally:
        os.close(fd)


@pytest.mark.parametrize("M", [C, R])
def test_damaged_blob_is_an_error(M, tmp_path, good):
    # The block header at access point 2 made invalid (BTYPE 11), which
    # zlib always notices.  Damage it cannot notice (most flips inside
    # Huffman data or a stored block, or an index made for another blob of
    # the same size) reads as wrong bytes: the format has no checksum per
    # access point, only the gzip trailer's CRC over the whole member
    # (documented in docs/formats.md).
    idx = gzindex.parse_index(good)
    e2 = idx.entries[2]
    bad = bytearray(GZ)
    start = 8 * e2.en_pos - e2.bits                 # bit position of the block header
    for bit in range(start, start + 3):
        bad[bit // 8] |= 1 << (bit % 8)
    fd, g = _backing(M, tmp_path, bytes(bad), idx)
    try:
        with pytest.raises(CorruptDataError) as e:
            g.pread(e2.de_pos, 200000)
        assert e.value.field == "gzip stream from access point 2" and "blob.gz[gzip]" in str(e.value)
        assert e.value.value == -3                          # Z_DATA_ERROR
    finally:
        os.close(fd)


@pytest.mark.parametrize("M", [C, R])
def test_stream_shorter_than_the_index_says(M, tmp_path, good):
    idx = gzindex.parse_index(good)
    idx.uncompress_file_size = len(DATA) + 5000
    fd, g = _backing(M, tmp_path, GZ, idx)
    try:
        with pytest.raises(CorruptDataError) as e:
            g.pread(len(DATA) - 10, 1000)
        assert e.value.field == "uncompress_file_size" and e.value.value == len(DATA)
    finally:
        os.close(fd)


@pytest.mark.parametrize("M", [C, R])
def test_backing_checks_an_index_object_it_is_given(M, tmp_path, good):
    # an index object not from the parser must not make the reader read outside its windows
    cases = [
        (lambda e: [], "access point 0 de_pos"),
        (lambda e: [e[0]._replace(de_pos=7)] + e[1:], "access point 0 de_pos"),
        (lambda e: e[:1] + [e[2], e[1]] + e[3:], "access point 2 de_pos"),
        (lambda e: e[:1] + [e[1]._replace(en_pos=len(GZ) + 1)] + e[2:], "access point 1 en_pos"),
        (lambda e: e[:1] + [e[1]._replace(bits=9)] + e[2:], "access point 1 bits"),
        (lambda e: e[:1] + [e[1]._replace(win_len=1 << 30)] + e[2:], "access point 1 win_off"),
        (lambda e: e[:1] + [e[1]._replace(win_pos=3)] + e[2:], "access point 1 win_off"),
    ]
    for change, field in cases:
        idx = gzindex.parse_index(good)
        idx.entries = change(list(idx.entries))
        fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT)
        os.write(fd, GZ)
        try:
            with pytest.raises(FormatError) as e:
                gzindex.open_backing(M.RawBacking(fd, 0, len(GZ), "b"), idx, "g", impl=M)
            assert e.value.field == field
        finally:
            os.close(fd)
            os.unlink(tmp_path / "x")
