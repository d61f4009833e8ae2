"""The core's GzipBacking checks the access points it is given on its own
terms (it takes plain ints and bytes, not a parsed index file): whatever
points, windows and size it is passed, the C core and its pure-Python twin
either both refuse them with the same FormatError field (naming the
backing), or both make a backing whose reads give the same bytes or the same
error, never a crash, an out-of-bounds read or another exception.  The
points are drawn around a real index (tcmu_obd.format.gzindex) of a real
gzip blob, so most of them are nearly valid.
"""
import gzip
import io
import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from tcmu_obd.core import _lsmt as C
from tcmu_obd.core import reference as R
from tcmu_obd.errors import FormatError, ObdError
from tcmu_obd.format import gzindex

_rng = random.Random(11)
DATA = b"".join(_rng.choice([b"bin ", b"etc\n", b"%d " % _rng.randrange(10 ** 5)]) for _ in range(120000))
GZ = gzip.compress(DATA, 6, mtime=0)


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gzpoints")
    idx = gzindex.build_index(io.BytesIO(GZ), tmp / "i.gzidx", span=65536)
    p = tmp / "blob.gz"
    p.write_bytes(GZ)
    fd = os.open(p, os.O_RDONLY)
    yield idx, fd
    os.close(fd)


def outcome(fn):
    try:
        return ("ok", fn())
    except ObdError as e:
        return ("err", type(e).__name__, getattr(e, "field", None))


def make(M, fd, points, windows, size, raw=False):
    return M.GzipBacking(M.RawBacking(fd, 0, len(GZ), "blob.gz"), points, windows, size, "pts[gzip]",
                         raw_windows=raw)


def refused(M, fd, points, windows, size, raw=False):
    with pytest.raises(FormatError) as e:
        make(M, fd, points, windows, size, raw)
    assert "pts[gzip]" in str(e.value)
    return e.value.field


@pytest.mark.parametrize("M", [C, R])
def test_plain_points_read_the_stream(M, blob):
    idx, fd = blob
    g = make(M, fd, idx.access_points(), idx.window_area, idx.uncompress_file_size)
    assert g.points == len(idx.entries) and g.size == len(DATA)
    assert g.pread(100000, 5000) == DATA[100000:105000]
    # a bytearray or memoryview of the windows works as bytes do
    g = make(M, fd, idx.access_points(), memoryview(bytearray(idx.window_area)), idx.uncompress_file_size)
    assert g.pread(len(DATA) - 10, 10) == DATA[-10:]


@pytest.mark.parametrize("M", [C, R])
def test_each_bad_value_is_refused_with_its_field(M, blob):
    idx, fd = blob
    pts, wins, size = idx.access_points(), idx.window_area, idx.uncompress_file_size

    def with_point(i, k, v):
        p = list(pts)
        q = list(p[i])
        q[k] = v
        p[i] = tuple(q)
        return p
    assert refused(M, fd, [], wins, size) == "access point 0 de_pos"
    assert refused(M, fd, pts, wins, -1) == "size"
    assert refused(M, fd, pts, wins, 1 << 63) == "size"
    assert refused(M, fd, pts, wins, "12") == "size"
    assert refused(M, fd, pts, wins, size, raw=True) == "access point 0 win_len"
    assert refused(M, fd, [(0, 10, 0)] + pts[1:], wins, size) == "access point 0"
    assert refused(M, fd, [None] + pts[1:], wins, size) == "access point 0"
    assert refused(M, fd, with_point(0, 0, 1), wins, size) == "access point 0 de_pos"
    assert refused(M, fd, with_point(1, 0, 1.5), wins, size) == "access point 1 de_pos"
    assert refused(M, fd, with_point(2, 0, pts[1][0] - 1), wins, size) == "access point 2 de_pos"
    assert refused(M, fd, with_point(1, 0, size + 1), wins, size) == "access point 1 de_pos"
    assert refused(M, fd, with_point(1, 1, -1), wins, size) == "access point 1 en_pos"
    assert refused(M, fd, with_point(1, 1, len(GZ) + 1), wins, size) == "access point 1 en_pos"
    # bits != 0 reads the byte before en_pos: en_pos 0 is refused then
    assert refused(M, fd, [pts[0], (pts[1][0], 0, 3, pts[1][3], pts[1][4])] + pts[2:],
                   wins, size) == "access point 1 en_pos"
    assert refused(M, fd, with_point(1, 2, 8), wins, size) == "access point 1 bits"
    assert refused(M, fd, with_point(1, 2, -1), wins, size) == "access point 1 bits"
    assert refused(M, fd, with_point(1, 4, 0), wins, size) == "access point 1 win_len"
    assert refused(M, fd, with_point(1, 4, 1 << 32), wins, size) == "access point 1 win_len"
    assert refused(M, fd, with_point(1, 3, -1), wins, size) == "access point 1 win_off"
    assert refused(M, fd, with_point(1, 3, len(wins)), wins, size) == "access point 1 win_off"
    assert refused(M, fd, with_point(1, 3, 1 << 64), wins, size) == "access point 1 win_off"


_POINT = st.tuples(st.integers(-2, 1 << 21), st.integers(-2, 1 << 17), st.integers(-1, 8),
                   st.integers(-2, 1 << 16), st.integers(-1, 1 << 16))


@settings(max_examples=150)
@given(data=st.data())
def test_any_points_give_the_same_answer_in_both_modules(blob, data):
    idx, fd = blob
    pts = idx.access_points()
    how = data.draw(st.sampled_from(["valid-changed", "random"]))
    if how == "random":
        points = data.draw(st.lists(_POINT, max_size=6))
        if points and data.draw(st.booleans()):
            points[0] = (0,) + points[0][1:]
    else:
        points = list(pts)
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(points) - 1))
            k = data.draw(st.integers(0, 4))
            q = list(points[i])
            q[k] = data.draw(st.one_of(st.integers(-1, 1 << 21), st.sampled_from([0, 1, 7, 32768, q[k] + 1])))
            points[i] = tuple(q)
    wins = idx.window_area
    if data.draw(st.booleans()):
        wins = wins[:data.draw(st.integers(0, len(wins)))]
    size = data.draw(st.sampled_from([idx.uncompress_file_size, idx.uncompress_file_size + 70000,
                                      idx.uncompress_file_size // 2, 0]))
    raw = data.draw(st.booleans()) if how == "random" else False
    ranges = [(data.draw(st.integers(0, size + 10)), data.draw(st.integers(1, 150000))) for _ in range(3)]
    res = {}
    for M in (C, R):
        made = outcome(lambda: make(M, fd, points, wins, size, raw))
        if made[0] != "ok":
            res[M] = made
            continue
        g = made[1]
        res[M] = [outcome(lambda: g.pread(off, n)) for off, n in ranges]
    assert res[C] == res[R]
