"""Random reads of a gzip blob's decompressed stream through GzipBacking
(the Cython core and its pure-Python twin) equal the model: the
uncompressed bytes.  Data is random (compressible, incompressible, mixed),
gzipped by Python's gzip module at levels 1-9 or by the gzip command (-6),
indexed by build_index, read back at random offsets and lengths, through a
Stack too, from several threads, and past the end (E_SHORT after the bytes
inside the stream).
"""
import gzip
import io
import os
import random
import shutil
import subprocess
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tcmu_obd.core import _lsmt as C
from tcmu_obd.core import reference as R
from tcmu_obd.errors import ReadError
from tcmu_obd.format import gzindex


def make_data(rng, kind, n):
    if kind == "random":
        return rng.randbytes(n)
    if kind == "text":
        words = [b"lorem ", b"ipsum ", b"dolor\n", b"sit ", b"amet, ", b"\x00" * 64]
        out = bytearray()
        while len(out) < n:
            out += rng.choice(words)
        return bytes(out[:n])
    out = bytearray()                                  # mixed runs
    while len(out) < n:
        k = rng.randrange(1, 200000)
        out += make_data(rng, rng.choice(["random", "text"]), k)
    return bytes(out[:n])


def open_pair(tmp, gz, span=65536):
    """(gz path, index, {module: GzipBacking}) with the fds kept open by the caller's test."""
    p = os.path.join(tmp, "blob.gz")
    with open(p, "wb") as f:
        f.write(gz)
    idx = gzindex.build_index(io.BytesIO(gz), os.path.join(tmp, "blob.gzidx"), span=span)
    fd = os.open(p, os.O_RDONLY)
    backs = {}
    for M in (C, R):
        t = M.RawBacking(fd, 0, len(gz), "blob.gz")
        backs[M] = gzindex.open_backing(t, idx, "blob.gz[gzip]", impl=M)
    return fd, idx, backs


def check_reads(backs, data, rng, n_reads, twin_reads):
    size = len(data)
    for k in range(n_reads):
        off = rng.randrange(0, size + 1)
        n = rng.choice([1, 512, 4096, 65536, rng.randrange(1, 3 << 20)])
        assert backs[C].pread(off, n) == data[off:off + n], (off, n)
        if k < twin_reads:
            assert backs[R].pread(off, n) == data[off:off + n], (off, n)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1 << 30), kind=st.sampled_from(["random", "text", "mixed"]),
       size=st.integers(0, 3 << 20), level=st.integers(1, 9), span=st.sampled_from([65536, 1 << 20]))
def test_random_reads_equal_the_model(tmp_path, seed, kind, size, level, span):
    rng = random.Random(seed)
    data = make_data(rng, kind, size)
    d = tmp_path / f"c{seed}-{level}"
    d.mkdir(exist_ok=True)
    fd, idx, backs = open_pair(str(d), gzip.compress(data, level, mtime=0), span)
    try:
        assert backs[C].size == backs[R].size == len(data) == idx.uncompress_file_size
        assert backs[C].pread(0, len(data) + 10) == data
        check_reads(backs, data, rng, 40, 6)
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("gzip") is None, reason="no gzip command")
@pytest.mark.parametrize("kind", ["random", "text", "mixed"])
def test_gzip_command_output_reads_back(tmp_path, kind):
    rng = random.Random(kind)
    data = make_data(rng, kind, 5 << 20)
    gz = subprocess.run(["gzip", "-6", "-c"], input=data, stdout=subprocess.PIPE, check=True).stdout
    fd, idx, backs = open_pair(str(tmp_path), gz, 1 << 20)
    try:
        bits = {e.bits for e in idx.entries[1:]}
        if kind == "random":
            assert bits == {0}                 # stored blocks end byte-aligned
        check_reads(backs, data, rng, 60, 8)
    finally:
        os.close(fd)


def test_some_access_points_need_priming(tmp_path):
    # the twin's priming path (bits != 0) must be exercised: text data gives it
    rng = random.Random(2)
    data = make_data(rng, "text", 4 << 20)
    fd, idx, backs = open_pair(str(tmp_path), gzip.compress(data, 6), 65536)
    try:
        primed = [i for i, e in enumerate(idx.entries) if e.bits]
        assert len(primed) >= 3
        for i in primed[:6]:
            de = idx.entries[i].de_pos
            for M in (C, R):
                assert backs[M].pread(de, 70000) == data[de:de + 70000]
                assert backs[M].pread(de + 1000, 100) == data[de + 1000:de + 1100]
    finally:
        os.close(fd)


def test_read_past_the_end_is_short_after_the_bytes_inside(tmp_path):
    rng = random.Random(3)
    data = make_data(rng, "mixed", 300000)
    fd, idx, backs = open_pair(str(tmp_path), gzip.compress(data), 65536)
    try:
        for M in (C, R):
            # through a stack (the warp layer's path): record past the stream's end
            lower = M.Index()
            lower.insert(0, 1000, 0, False, 0)              # 512000 bytes > 300000
            st_ = M.Stack([backs[M]], lower)
            with pytest.raises(ReadError) as e:
                st_.read(0, 512000)
            assert "blob.gz[gzip]" in str(e.value) and "ends at byte 300000" in str(e.value)
            assert st_.read(299520 - 4096, 4096) == data[299520 - 4096:299520]
            # a Backing's own pread clamps to the size
            assert backs[M].pread(299000, 5000) == data[299000:]
    finally:
        os.close(fd)


def test_stack_reads_through_gzip_backing(tmp_path):
    rng = random.Random(4)
    data = make_data(rng, "mixed", 3 << 20)
    fd, idx, backs = open_pair(str(tmp_path), gzip.compress(data, 6), 65536)
    try:
        for M in (C, R):
            lower = M.Index()
            # sectors 100.. map to the stream's byte 512*7, a gap, then more
            lower.insert(100, 2000, 7, False, 0)
            lower.insert(3000, 3000, 2000, False, 0)
            stk = M.Stack([backs[M]], lower)
            got = stk.read(100 * 512, 6000 * 512)
            want = bytearray(6000 * 512)
            want[0:2000 * 512] = data[7 * 512:2007 * 512]
            want[2900 * 512:5900 * 512] = data[2000 * 512:5000 * 512]
            assert got == bytes(want)
    finally:
        os.close(fd)


def test_concurrent_readers_get_the_right_bytes(tmp_path):
    rng = random.Random(5)
    data = make_data(rng, "mixed", 6 << 20)
    fd, idx, backs = open_pair(str(tmp_path), gzip.compress(data, 6), 65536)
    g = gzindex.open_backing(backs[C].target, idx, "small-cache", cache_slots=1, impl=C)
    bad = []

    def reader(seed):
        r = random.Random(seed)
        for _ in range(150):
            b = g if r.random() < 0.5 else backs[C]
            off = r.randrange(len(data))
            n = r.randrange(1, 300000)
            if b.pread(off, n) != data[off:off + n]:
                bad.append((off, n))

    try:
        ts = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(300)
            assert not t.is_alive()
        assert bad == []
    finally:
        os.close(fd)


def test_no_cache_and_sequential_pieces_of_a_long_span(tmp_path):
    # one access point over 12 MiB of zeros+text: the span is read in 1 MiB pieces
    rng = random.Random(6)
    data = bytes(6 << 20) + make_data(rng, "text", 6 << 20)
    gz = gzip.compress(data, 9)
    fd, idx, backs = open_pair(str(tmp_path), gz, 1 << 24)
    try:
        assert len(idx.entries) <= 3
        for slots in (0, 2):
            g = gzindex.open_backing(backs[C].target, idx, "g", cache_slots=slots, impl=C)
            out = bytearray()
            for off in range(0, len(data), 200000):
                out += g.pread(off, 200000)
            assert bytes(out) == data
            for _ in range(20):
                off = rng.randrange(len(data))
                assert g.pread(off, 5000) == data[off:off + 5000]
    finally:
        os.close(fd)


def test_constructor_checks(tmp_path):
    rng = random.Random(7)
    data = make_data(rng, "text", 100000)
    gz = gzip.compress(data)
    fd, idx, backs = open_pair(str(tmp_path), gz)
    try:
        for M in (C, R):
            short = M.RawBacking(fd, 0, len(gz) - 1, "blob.gz")
            with pytest.raises(gzindex.FormatError) as e:
                gzindex.open_backing(short, idx, "x", impl=M)
            assert e.value.field == "gzip_file_size" and e.value.value == len(gz)
            with pytest.raises(gzindex.FormatError) as e:
                gzindex.open_backing(short, str(tmp_path / "blob.gzidx"), "x", impl=M)
            assert e.value.field == "gzip_file_size" and str(tmp_path / "blob.gzidx") in str(e.value)
            g = gzindex.open_backing(M.RawBacking(fd, 0, len(gz), "b"), str(tmp_path / "blob.gzidx"), "x", impl=M)
            assert g.pread(0, 100) == data[:100]
            with pytest.raises(gzindex.UsageError):
                gzindex.open_backing(M.RawBacking(fd, 0, len(gz), "b"), idx, "x", cache_slots=65, impl=M)
            with pytest.raises(gzindex.UsageError):
                g.attach(M.Presence(len(gz), 4096), None)
    finally:
        os.close(fd)
