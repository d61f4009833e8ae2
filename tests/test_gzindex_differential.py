"""The Cython GzipBacking and its pure-Python twin give the same answers:
the same bytes, or the same exception class with the same field, for
random reads through valid indexes and through indexes whose entries were
changed (moved access points, wrong bits, swapped windows, a lying
uncompress_file_size) while still passing the parser.
"""
import gzip
import io
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tcmu_obd.core import _lsmt as C
from tcmu_obd.core import reference as R
from tcmu_obd.errors import FormatError, ObdError
from tcmu_obd.format import gzindex


def _blob():
    rng = random.Random(21)
    parts = []
    while sum(map(len, parts)) < 700000:
        k = rng.randrange(1, 40000)
        parts.append(rng.randbytes(k) if rng.random() < 0.3 else b"".join(
            rng.choice([b"usr/bin ", b"lib\n", b"%d " % rng.randrange(5000)]) for _ in range(k // 5)))
    data = b"".join(parts)
    return data, gzip.compress(data, 6, mtime=0)


DATA, GZ = _blob()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gzdiff")
    idx = gzindex.build_index(io.BytesIO(GZ), tmp / "i", span=65536)
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


def both(idx, fd, ranges):
    res = {}
    for M in (C, R):
        made = outcome(lambda: gzindex.open_backing(M.RawBacking(fd, 0, len(GZ), "blob.gz"), idx, "blob.gz[gzip]", impl=M))
        if made[0] != "ok":             # an index object the backing refuses (check_points)
            res[M] = [made]
            continue
        g = made[1]
        res[M] = [outcome(lambda: g.pread(o, n)) for o, n in ranges]
    return res[C], res[R]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_cores_agree_on_valid_and_changed_indexes(setup, data):
    idx, fd = setup
    entries = list(idx.entries)
    change = data.draw(st.sampled_from(["none", "de", "en", "bits", "window", "size"]))
    k = data.draw(st.integers(1, len(entries) - 1))
    e = entries[k]
    if change == "de":
        lo = entries[k - 1].de_pos
        hi = entries[k + 1].de_pos if k + 1 < len(entries) else idx.uncompress_file_size
        entries[k] = e._replace(de_pos=data.draw(st.integers(lo, hi)))
    elif change == "en":
        lo = entries[k - 1].en_pos
        hi = entries[k + 1].en_pos if k + 1 < len(entries) else len(GZ)
        entries[k] = e._replace(en_pos=data.draw(st.integers(max(lo, 1), hi)))
    elif change == "bits":
        entries[k] = e._replace(bits=data.draw(st.integers(0, 7)))
    elif change == "window":
        other = entries[data.draw(st.integers(0, len(entries) - 1))]
        entries[k] = e._replace(win_pos=other.win_pos, win_len=other.win_len)
    changed = gzindex.GzIndex(idx.path, {f: getattr(idx, f) for f in (
        "dict_compress_algo", "gzip_file_size", "uncompress_file_size", "span")}, entries, idx.window_area)
    if change == "size":
        changed.uncompress_file_size = data.draw(st.integers(0, 2 * len(DATA)))
    size = changed.uncompress_file_size
    ranges = [(data.draw(st.integers(0, size + 100)), data.draw(st.sampled_from([1, 4096, 100000, 1 << 20])))
              for _ in range(data.draw(st.integers(1, 4)))]
    c, r = both(changed, fd, ranges)
    assert c == r
    if change == "none":
        assert all(x[0] == "ok" for x in c)
        assert [x[1] for x in c] == [DATA[o:o + n] for o, n in ranges]


def test_parser_errors_are_format_errors(setup):
    idx, fd = setup
    with pytest.raises(FormatError):
        gzindex.parse_index(b"\0" * 400, path="x")
