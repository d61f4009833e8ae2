"""gzindex.GzipIndexReader: the decompressed stream of a gzip blob read
through a worker thread that inflates ahead, with the index written on the
way.  Against a simple model (zlib's own decompression for the bytes,
build_index for the index file): any mix of read() and skip() of any sizes,
over any buffer and input chunk sizes, gives the stream's bytes and an index
byte-identical to build_index's.  Bad input: a corrupt or truncated blob, a
read error from the blob file, and a reader closed half way (the worker
stops; nothing hangs); every one leaves no index file behind.
"""
import gzip
import io
import random
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from tcmu_obd.errors import FormatError
from tcmu_obd.format import gzindex


def sample(size, seed):
    """Bytes that deflate into many blocks: runs of text-like and random data."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.5:
            out += rng.randbytes(rng.randrange(1, 20000))
        else:
            word = rng.randbytes(rng.randrange(1, 12))
            out += word * rng.randrange(1, 3000)
    return bytes(out[:size])


def reference_index(tmp_path, gz, span):
    ref = tmp_path / "ref.meta"
    gzindex.build_index(io.BytesIO(gz), ref, span=span)
    return ref.read_bytes()


def open_reader(tmp_path, gz, span, **kw):
    w = gzindex.GzipIndexWriter(tmp_path / "out.meta", span=span, name="blob.tar.gz")
    return gzindex.GzipIndexReader(io.BytesIO(gz), w, **kw)


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 1500000), span=st.sampled_from([65536, 131072, 1 << 20]),
       buf_size=st.integers(1, 1 << 20), in_size=st.integers(1, 200000), ahead=st.integers(1, 5),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 200000)), max_size=40),
       trailer=st.binary(max_size=50))
def test_gzindex_worker_reader_matches_model(tmp_path_factory, seed, size, span, buf_size, in_size, ahead, ops,
                                             trailer):
    tmp_path = tmp_path_factory.mktemp("r")
    data = sample(size, seed)
    gz = gzip.compress(data, 6, mtime=0) + trailer          # bytes after the first member: counted, not read
    r = open_reader(tmp_path, gz, span, buf_size=buf_size, in_size=in_size, ahead=ahead)
    pos = 0
    try:
        for is_skip, n in ops:
            if is_skip:
                got = r.skip(n)
                assert got == min(n, len(data) - pos)
            else:
                got = r.read(n)
                assert got == data[pos:pos + n]
                got = len(got)
            pos += got
        info = r.finish()
    finally:
        r.close()
    assert info.uncompress_file_size == len(data) and info.gzip_file_size == len(gz)
    assert (tmp_path / "out.meta").read_bytes() == reference_index(tmp_path, gz, span)


@pytest.mark.parametrize("span,buf_size", [(1 << 20, 1 << 20), (65536, 4 << 20)])
def test_gzindex_worker_reader_readinto_whole_stream(tmp_path, span, buf_size):
    data = sample(3 << 20, 1)
    gz = gzip.compress(data, 6, mtime=0)
    r = open_reader(tmp_path, gz, span, buf_size=buf_size, in_size=65536)
    out = bytearray()
    b = bytearray(70000)
    while True:
        n = r.readinto(b)
        if not n:
            break
        out += b[:n]
    assert bytes(out) == data
    info = r.finish(len(gz))
    r.close()
    assert len(info.entries) > (3 << 20) // span // 2
    assert (tmp_path / "out.meta").read_bytes() == reference_index(tmp_path, gz, span)


def test_gzindex_worker_reader_corrupt_blob(tmp_path):
    data = sample(2 << 20, 2)
    gz = bytearray(gzip.compress(data, 6, mtime=0))
    at = len(gz) // 2
    gz[at:at + 64] = bytes(64)                       # a run of zeros in the middle of the deflate stream
    r = open_reader(tmp_path, bytes(gz), 65536, buf_size=65536)
    got = bytearray()
    with pytest.raises(FormatError) as e:
        while True:
            c = r.read(100000)
            if not c:
                break
            got += c
    r.close()
    msg = str(e.value)
    assert "blob.tar.gz" in msg and "gzip data" in msg and "does not inflate" in msg
    good = zlib.decompressobj(47).decompress(bytes(gz[:at]))     # what the blob decodes to before the damage
    assert len(got) >= len(good) and got.startswith(good)
    assert not (tmp_path / "out.meta").exists()


def test_gzindex_worker_reader_truncated_blob(tmp_path):
    data = sample(1 << 20, 3)
    gz = gzip.compress(data, 6, mtime=0)
    r = open_reader(tmp_path, gz[:len(gz) // 2], 65536)
    got = r.read(len(data))
    assert 0 < len(got) < len(data) and data.startswith(got) and r.read(10) == b""
    with pytest.raises(FormatError) as e:
        r.finish()
    r.close()
    assert "blob.tar.gz" in str(e.value) and "ends before the end of its first member" in str(e.value)
    assert not (tmp_path / "out.meta").exists()


class FailingFile(io.RawIOBase):
    """The real blob file, with a read error injected after `ok` bytes (a
    failing disk cannot be made on demand)."""

    def __init__(self, path, ok):
        self.f = open(path, "rb", buffering=0)
        self.ok = ok

    def readable(self):
        return True

    def readinto(self, b):
        if self.ok <= 0:
            raise OSError(5, "Input/output error", "blob.tar.gz")
        n = self.f.readinto(memoryview(b)[:self.ok])
        self.ok -= n
        return n

    def close(self):
        self.f.close()
        super().close()


def test_gzindex_worker_reader_read_error(tmp_path):
    data = sample(2 << 20, 4)
    (tmp_path / "blob.tar.gz").write_bytes(gzip.compress(data, 6, mtime=0))
    raw = FailingFile(tmp_path / "blob.tar.gz", 300000)
    w = gzindex.GzipIndexWriter(tmp_path / "out.meta", span=65536, name="blob.tar.gz")
    r = gzindex.GzipIndexReader(raw, w, in_size=65536, buf_size=65536)
    with pytest.raises(OSError) as e:
        r.skip(len(data))
    r.close()
    raw.close()
    assert e.value.errno == 5 and e.value.filename == "blob.tar.gz"
    assert not (tmp_path / "out.meta").exists()


def test_gzindex_worker_reader_close_half_way(tmp_path):
    data = sample(4 << 20, 5)
    gz = gzip.compress(data, 6, mtime=0)
    r = open_reader(tmp_path, gz, 65536, buf_size=65536, ahead=2)
    assert r.read(1000) == data[:1000]
    r.close()                                        # the worker blocks for a free buffer: woken and ended
    assert not r._worker.is_alive()
    r.writer.abort()
    assert not (tmp_path / "out.meta").exists()


def test_gzindex_worker_reader_not_gzip(tmp_path):
    r = open_reader(tmp_path, b"not a gzip stream at all" * 100, 65536)
    with pytest.raises(FormatError) as e:
        r.read(10)
    r.close()
    assert "blob.tar.gz" in str(e.value) and "gzip data" in str(e.value)
    assert not (tmp_path / "out.meta").exists()
