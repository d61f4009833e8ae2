"""The gzip index writer (tcmu_obd.format.gzindex) against index files built
by hand from the format description: a gzip stream is assembled block by
block here (stored blocks, which end byte-aligned, and fixed-Huffman blocks
of literals, which end anywhere inside a byte), so every block boundary's
compressed bit position is known without zlib; the expected access points
follow overlaybd's thinning rule, the windows are the 32 KiB before each
point (zeros before the first 32 KiB), and the header, table and crc are
packed field by field.  The writer must produce the same bytes, fed whole or
in any chunking, and stop at the end of the first gzip member.
"""
import io
import random
import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from tcmu_obd.format import gzindex

WIN = 32768


class BitWriter:
    """LSB-first bits into a bytearray (deflate's order)."""

    def __init__(self):
        self.buf = bytearray()
        self.acc = 0
        self.nacc = 0
        self.n = 0

    def put(self, value, nbits):
        self.acc |= value << self.nacc
        self.nacc += nbits
        self.n += nbits
        while self.nacc >= 8:
            self.buf.append(self.acc & 0xFF)
            self.acc >>= 8
            self.nacc -= 8

    def huff(self, code, nbits):
        self.put(int(format(code, f"0{nbits}b")[::-1], 2), nbits)

    def align(self):
        if self.nacc:
            self.put(0, 8 - self.nacc)

    def bytes(self):
        return bytes(self.buf) + (bytes([self.acc]) if self.nacc else b"")


def hand_gzip(blocks):
    """A gzip member from (kind, data) blocks ("stored" or "fixed"), the last
    one final.  Returns (gzip bytes, boundaries): boundaries[k] = (bit
    position in the deflate stream, output bytes so far) after block k."""
    w = BitWriter()
    out = 0
    bounds = []
    for k, (kind, data) in enumerate(blocks):
        final = 1 if k == len(blocks) - 1 else 0
        w.put(final, 1)
        if kind == "stored":
            w.put(0, 2)
            w.align()
            w.put(len(data), 16)
            w.put(len(data) ^ 0xFFFF, 16)
            for b in data:
                w.put(b, 8)
        else:
            w.put(1, 2)
            for b in data:
                if b < 144:
                    w.huff(0x30 + b, 8)
                else:
                    w.huff(0x190 + b - 144, 9)
            w.huff(0, 7)
        out += len(data)
        bounds.append((w.n, out))
    whole = b"".join(d for _, d in blocks)
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return head + w.bytes() + struct.pack("<II", zlib.crc32(whole), len(whole) & 0xFFFFFFFF), bounds, whole


def expected_index(gz, bounds, whole, span, level=6, gzip_size=None):
    """The index file as the format description says overlaybd writes it."""
    cands = [(0, 10, 0)]                               # right after the 10-byte gzip header
    for pos, out in bounds[:-1]:                       # not after the last block
        nbytes = (pos + 7) // 8
        cands.append((out, 10 + nbytes, nbytes * 8 - pos))
    points, last, expected = [], None, 0
    for c in cands:
        de = c[0]
        if de < expected:
            last = c
            continue
        if de > expected:
            if last is not None:
                points.append(last)
            last = c
            while expected < de:
                expected += span
        if de == expected:
            last = None
            points.append(c)
            expected += span
    body, entries = b"", []
    for de, en, bits in points:
        window = (bytes(WIN) + whole[:de])[-WIN:]
        stored = zlib.compress(window, level)
        entries.append(struct.pack("<qqqBI", de, en, 333 + len(body), bits, len(stored)))
        body += stored
    table = zlib.compress(b"".join(entries), level)
    size = 333 + len(body) + len(table)
    head = (b"ddgzidx\0" + bytes([1, 0, 1, level, 0]) + struct.pack("<iii", span, WIN, 29)
            + struct.pack("<qqqq", len(points), len(gz) if gzip_size is None else gzip_size, size, len(whole))
            + bytes(256) + struct.pack("<qq", 333 + len(body), len(table)))
    return head + struct.pack("<I", crc32c_photon(head)) + body + table, points


def crc32c_photon(data):
    """CRC32C, reflected polynomial 0x82F63B78, register starting at 0, no final xor."""
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


def _text(rng, n):
    words = [b"alpha ", b"beta ", b"gamma\n", b"delta ", b"\x00" * 7, b"zeta "]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


def _blocks(rng, n, sizes):
    blocks = []
    for _ in range(n):
        size = rng.choice(sizes)
        if rng.random() < 0.4:
            blocks.append(("stored", rng.randbytes(min(size, 65535))))
        else:
            data = _text(rng, size) if rng.random() < 0.5 else rng.randbytes(size)
            blocks.append(("fixed", data))
    return blocks


def _build(tmp_path, gz, **kw):
    out = tmp_path / "idx"
    gzindex.build_index(io.BytesIO(gz), out, **kw)
    return out.read_bytes()


def test_core_crc32c_is_the_photon_variant():
    from tcmu_obd.core import crc32c
    for data in (b"", b"123456789", bytes(range(256)) * 3):
        assert crc32c(data, 0) == crc32c_photon(data)
    assert crc32c(b"123456789", 0) != 0xE3069283      # not the standard CRC-32C


@pytest.mark.parametrize("span", [65536, 1 << 20])
@pytest.mark.parametrize("seed", [1, 2])
def test_writer_matches_hand_built_index(tmp_path, span, seed):
    rng = random.Random(seed)
    gz, bounds, whole = hand_gzip(_blocks(rng, 40, [1, 700, 5000, 30000, 65535]))
    want, points = expected_index(gz, bounds, whole, span)
    if span == 65536:
        assert any(p[2] for p in points) and any(not p[2] for p in points[1:]), "both bits cases"
    assert _build(tmp_path, gz, span=span) == want


def test_writer_points_exactly_at_span_multiples(tmp_path):
    # 32 KiB blocks: boundaries fall on every multiple of the span (the de_pos == expected rule)
    rng = random.Random(5)
    blocks = [("fixed" if k % 2 else "stored", rng.randbytes(WIN)) for k in range(20)]
    gz, bounds, whole = hand_gzip(blocks)
    want, points = expected_index(gz, bounds, whole, 65536)
    assert [p[0] for p in points] == list(range(0, 19 * WIN, 65536))
    assert _build(tmp_path, gz, span=65536) == want


def test_writer_level_and_raw_windows(tmp_path):
    rng = random.Random(7)
    gz, bounds, whole = hand_gzip(_blocks(rng, 30, [3000, 40000]))
    want, _ = expected_index(gz, bounds, whole, 65536, level=1)
    assert _build(tmp_path, gz, span=65536, level=1) == want
    # dict_compress_algo 0: windows and table stored raw
    out = tmp_path / "raw"
    w = gzindex.GzipIndexWriter(out, span=65536, dict_compress_algo=0)
    w.write(gz)
    idx = w.finish()
    assert idx.dict_compress_algo == 0 and all(e.win_len == WIN for e in idx.entries)
    assert idx.index_area_len == 29 * len(idx.entries)


def test_multi_member_gzip_stops_at_the_first(tmp_path):
    rng = random.Random(11)
    gz, bounds, whole = hand_gzip(_blocks(rng, 20, [20000, 50000]))
    second = zlib.compress(b"second member" * 1000)           # any trailing bytes
    both = gz + b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + second
    want, _ = expected_index(gz, bounds, whole, 65536, gzip_size=len(both))
    assert _build(tmp_path, both, span=65536) == want
    idx = gzindex.parse_index(want, gzip_size=len(both))
    assert idx.uncompress_file_size == len(whole)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 1 << 30), cuts=st.lists(st.integers(1, 200000), min_size=1, max_size=40))
def test_streaming_any_chunking_same_file_and_output(tmp_path_factory, seed, cuts):
    tmp = tmp_path_factory.mktemp("stream")
    rng = random.Random(seed)
    gz, bounds, whole = hand_gzip(_blocks(rng, 15, [1, 500, 9000, 40000]))
    want, _ = expected_index(gz, bounds, whole, 65536)
    w = gzindex.GzipIndexWriter(tmp / "idx", span=65536)
    out, pos, k = bytearray(), 0, 0
    while pos < len(gz):
        n = cuts[k % len(cuts)]
        k += 1
        for piece in w.feed(gz[pos:pos + n]):
            assert len(piece) <= 1 << 20
            out += piece
        pos += n
    w.finish()
    assert bytes(out) == whole
    assert (tmp / "idx").read_bytes() == want


def test_truncated_gzip_is_refused_and_leaves_no_file(tmp_path):
    rng = random.Random(3)
    gz, _, _ = hand_gzip(_blocks(rng, 10, [20000]))
    for cut in (5, 100, len(gz) - 9, len(gz) - 1):
        out = tmp_path / f"idx{cut}"
        with pytest.raises(gzindex.FormatError) as e:
            gzindex.build_index(io.BytesIO(gz[:cut]), out, name="blob.gz")
        assert e.value.path == "blob.gz" and e.value.field == "gzip stream"
        assert not out.exists()


def test_corrupt_gzip_is_refused(tmp_path):
    rng = random.Random(4)
    gz, _, _ = hand_gzip(_blocks(rng, 10, [20000]))
    bad = bytearray(gz)
    bad[-8] ^= 1                                              # the crc32 of the trailer
    with pytest.raises(gzindex.FormatError) as e:
        gzindex.build_index(io.BytesIO(bytes(bad)), tmp_path / "i", name="blob.gz")
    assert e.value.field == "gzip data" and "does not inflate" in str(e.value)
    with pytest.raises(gzindex.FormatError):
        gzindex.build_index(io.BytesIO(b"not gzip at all" * 10), tmp_path / "j")


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(gzindex.UsageError):
        gzindex.GzipIndexWriter(tmp_path / "a", span=65535)
    with pytest.raises(gzindex.UsageError):
        gzindex.GzipIndexWriter(tmp_path / "b", level=10)
    with pytest.raises(gzindex.UsageError):
        gzindex.GzipIndexWriter(tmp_path / "c", dict_compress_algo=2)
