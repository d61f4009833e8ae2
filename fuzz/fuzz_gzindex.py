#!/usr/bin/env python3
"""Fuzz the gzip index: tcmu_obd.format.gzindex.parse_index, reads through
the core's GzipBacking over a real gzip blob (compared with the pure-Python
twin's), and the index writer (build_index) on arbitrary gzip-ish input.

Run: python fuzz/fuzz_gzindex.py -max_total_time=20   (or -runs=N, or a corpus dir)

Only tcmu_obd.errors.FormatError (CorruptDataError included) and ReadError
may escape, naming the file; anything else is a finding.  The two cores must
agree: the same bytes, or both an error of the same class.  An unmutated
index must read back the blob's real bytes.

Input modes (the first byte modulo 4 is the marker; the second selects the blob):
  0  raw: the rest is the index file;
  1  splice + fix: the rest is spliced into the blob's valid index, then
     index_file_size and the header crc are recomputed, so the fuzzer gets
     past them into the field, table and window checks and into reads;
  2  gzip: the rest is a gzip stream for build_index (then read back
     through its index when it builds);
  3  unmutated: the blob's own index (the reads must be right).
Not a test of speed: the blobs are small.
"""
import gzip
import io
import os
import random
import struct
import sys
import tempfile
import zlib

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _splice import splice  # noqa: E402  (fuzz/ is the script's directory)

with atheris.instrument_imports():
    from tcmu_obd.core import _lsmt as C
    from tcmu_obd.core import crc32c
    from tcmu_obd.core import reference as R
    from tcmu_obd.format import gzindex
    from tcmu_obd.errors import FormatError, ReadError

PATH = "fuzz-gzindex"
BAD_INPUT = (FormatError, ReadError)
TMP = tempfile.mkdtemp(prefix="fuzz-gzindex-")


def _blob(seed, n, level):
    rnd = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < n:
        k = rnd.randrange(1, 30000)
        parts.append(rnd.randbytes(k) if rnd.random() < 0.4 else (b"gz index %d " % rnd.randrange(999)) * (k // 12))
    data = b"".join(parts)[:n]
    gz = gzip.compress(data, level, mtime=0)
    out = os.path.join(TMP, f"seed{seed}.gzidx")
    gzindex.build_index(io.BytesIO(gz), out, span=65536)
    with open(out, "rb") as f:
        index = f.read()
    fd = os.memfd_create(f"blob{seed}")
    os.write(fd, gz)
    return {"data": data, "gz": gz, "index": index, "fd": fd}


BLOBS = [_blob(1, 200000, 6), _blob(2, 150000, 1), _blob(3, 300000, 9)]


def _read_all(M, blob, idx, ranges):
    """Per range: bytes, or the error class name."""
    out = []
    try:
        g = gzindex.open_backing(M.RawBacking(blob["fd"], 0, len(blob["gz"]), PATH + ".gz"), idx, PATH + "[gzip]", impl=M)
    except BAD_INPUT as e:
        return [type(e).__name__]
    for off, n in ranges:
        try:
            out.append(g.pread(off, n))
        except BAD_INPUT as e:
            assert (PATH + "[gzip]") in str(e), f"error does not name the backing: {e}"
            out.append(type(e).__name__)
    return out


def _ranges(fdp, size):
    rs = [(0, 4096), (max(0, size - 1000), 2000)]
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        rs.append((fdp.ConsumeIntInRange(0, size + 10), fdp.ConsumeIntInRange(1, 100000)))
    return rs


def _regions(index):
    """Header, its crc'd fields, the windows, the entry table."""
    start, = struct.unpack_from("<q", index, 313)
    return [(0, 333), (8, 57), (313, 16), (333, start - 333), (start, len(index) - start)]


def _fix(buf):
    b = bytearray(buf)
    if len(b) >= 333:
        struct.pack_into("<q", b, 41, len(b))
        struct.pack_into("<I", b, 329, crc32c(bytes(b[:329]), 0))
    return bytes(b)


def TestOneInput(data):
    if len(data) < 2:
        return
    mode, blob = data[0] % 4, BLOBS[data[1] % len(BLOBS)]
    rest = data[2:]
    fdp = atheris.FuzzedDataProvider(rest[-16:])
    if mode == 2:
        out = os.path.join(TMP, "built.gzidx")
        try:
            idx = gzindex.build_index(io.BytesIO(rest), out, span=65536, name=PATH)
        except BAD_INPUT as e:
            assert str(e).startswith(PATH + ": "), f"error does not name the stream: {e}"
            return
        d = zlib.decompressobj(31)
        first = d.decompress(rest)
        assert d.eof and idx.uncompress_file_size == len(first)
        fd = os.memfd_create("built")
        try:
            os.write(fd, rest)
            g = gzindex.open_backing(C.RawBacking(fd, 0, len(rest), PATH), idx, PATH + "[gzip]", impl=C)
            assert g.pread(0, len(first)) == first
        finally:
            os.close(fd)
        return
    if mode == 3:
        index = blob["index"]
    elif mode == 1:
        index = _fix(splice(blob["index"], _regions(blob["index"]), rest))
    else:
        index = rest
    try:
        idx = gzindex.parse_index(index, path=PATH, gzip_size=len(blob["gz"]))
    except BAD_INPUT as e:
        assert mode != 3, f"the unmutated index failed: {e}"
        assert str(e).startswith(PATH + ": "), f"error does not name the file: {e}"
        return
    ranges = _ranges(fdp, idx.uncompress_file_size)
    got = _read_all(C, blob, idx, ranges)
    twin = _read_all(R, blob, idx, ranges)
    assert got == twin, f"cores disagree: {[(type(a), type(b)) for a, b in zip(got, twin)]}"
    if mode == 3:
        for (off, n), b in zip(ranges, got):
            assert b == blob["data"][off:off + n], (off, n)


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
