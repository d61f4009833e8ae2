#!/usr/bin/env python3
"""Fuzz opening and reading one layer file (tcmu_obd.image.layer.open_layer) and
reopening an append-only RW pair (tcmu_obd.image.rw.RWLayer.open).

Run: python fuzz/fuzz_layer.py -max_total_time=20   (or -runs=N, or a corpus dir)

The input is written to a memfd and opened through /proc/self/fd/N, exactly
as a layer path.  On success the layer is stacked into an Image and read at
its first records and at offsets taken from the input.  Only
tcmu_obd.errors.FormatError (with CorruptDataError) and ReadError may escape,
and their message must start with the path; anything else (IndexError,
struct.error, OverflowError, OSError, MemoryError, even another ObdError
such as UsageError) is a finding.

Input modes (the first byte modulo 8 is the marker: 0-1 raw, 2-4 "S",
5-6 "Z", 7 "R"; the second byte is `sel`):
  "S" + sel  structure-aware: splice the rest into a real small valid layer
             (sel % 6: plain LSMT, sealed RW file, ZFile LZ4 with overwritten
             header, ZFile ZSTD with trailer only, tar + ZFile, plain LSMT
             with 90 records) so the fuzzer gets past the magic checks;
  "Z" + sel  splice into the *plaintext* LSMT (plain, sealed or many-records),
             then wrap it in a freshly built valid ZFile (LZ4 or ZSTD, header
             overwritten or not), so LSMT parsing is reached through the ZFile
             read path; the outcome (bytes read, or the error message) must be
             identical to opening the plaintext itself;
  "R" + sel  RW pair: splice into the index file (sel bit 0 clear) or the
             data file (set) of a real append-only pair and reopen it;
  anything   the bytes are the whole layer file.
A splice op is: region byte (which part of the seed: header / trailer /
index / anywhere / truncate), u16 offset inside that region, length byte,
then that many bytes.
"""

import io
import os
import random
import struct
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _splice import splice as splice_regions  # noqa: E402  (fuzz/ is the script's directory)

with atheris.instrument_imports():
    from tcmu_obd.image import commit, stack as image, layer, rw
    from tcmu_obd.format import lsmt, tar, zfile
    from tcmu_obd.errors import FormatError, ReadError

MAX_READ = 64 << 10          # bytes per read of the image
FD_CHECK_EVERY = 2000        # runs between descriptor-leak checks


# --------------------------------------------------------------- seeds
class _Seed:
    def __init__(self, name, blob, regions):
        self.name = name
        self.blob = bytes(blob)
        self.regions = regions       # [(start, length)]: header, trailer, index


def _lsmt_regions(blob):
    tr = lsmt.LsmtHeader.unpack(blob[-4096:], "seed", "trailer")
    return [(0, 4096), (len(blob) - 4096, 4096), (tr.index_offset, len(blob) - 4096 - tr.index_offset)]


def _zfile_regions(blob, base=0):
    size = len(blob) - base
    info, _ = zfile.read_info(lambda o, n: blob[base + o:base + o + n], size, "seed")
    return [(base, 512), (len(blob) - 512, 512), (base + info.index_offset, info.index_size * 4)]


def _zfile_bytes(payload, algo, overwrite):
    out = io.BytesIO()
    w = zfile.ZFileWriter(out, algo, 4096, True, overwrite)
    w.write(payload)
    w.close()
    return out.getvalue()


def _build_seeds():
    """Small valid layers made with the project's own writers."""
    rnd = random.Random(7)
    tmp = tempfile.mkdtemp(prefix="fuzz_layer_")
    d, i = os.path.join(tmp, "data"), os.path.join(tmp, "index")
    up = rw.RWLayer.create(d, i, 64 << 20)
    up.write(bytes(rnd.getrandbits(8) for _ in range(4096)), 0)
    up.write(b"A" * 1024, 1 << 20)
    up.write(bytes(rnd.getrandbits(8) for _ in range(1536)), 512)   # splits the first record
    up.discard(2 << 20, 8192)
    up.write(bytes(range(256)) * 4, 3 << 20)
    records = up.index.records()
    out = io.BytesIO()
    commit.compact(records, [up.backing], out, commit.layer_info([up.backing]))
    plain = out.getvalue()
    up.close()
    rw_data, rw_index = open(d, "rb").read(), open(i, "rb").read()
    sealer = rw.RWLayer.open(d, i)
    sealer.seal()
    sealer.close()
    sealed = open(d, "rb").read()
    zl = _zfile_bytes(plain, zfile.ALGO_LZ4, True)
    zz = _zfile_bytes(plain, zfile.ALGO_ZSTD, False)
    tp = os.path.join(tmp, "tar")
    with open(tp, "w+b") as f:
        with tar.TarWriter(f, mode=0o100644, uname=b"root", gname=b"root") as t:
            t.write(zl)
    tz = open(tp, "rb").read()
    # many small records (> 64, so the core builds its bucket search table)
    many = rw.RWLayer.create(d + "2", i + "2", 64 << 20)
    for k in range(90):
        if k % 7 == 3:
            many.discard(k * 8192, 1024)
        else:
            many.write(bytes([k]) * 512 * (1 + k % 3), k * 8192 + 512 * (k % 5))
    out = io.BytesIO()
    commit.compact(many.index.records(), [many.backing], out, commit.layer_info([many.backing]))
    many_plain = out.getvalue()
    many.close()
    for p in (d, i, tp, d + "2", i + "2"):
        os.unlink(p)
    os.rmdir(tmp)
    seeds = [
        _Seed("plain", plain, _lsmt_regions(plain)),
        _Seed("sealed", sealed, _lsmt_regions(sealed)),
        _Seed("zfile-lz4", zl, _zfile_regions(zl)),
        _Seed("zfile-zstd", zz, _zfile_regions(zz)),
        _Seed("tar-zfile", tz, [(0, 1536)] + _zfile_regions(tz, 1536)),
        _Seed("many-records", many_plain, _lsmt_regions(many_plain)),
    ]
    rw_seeds = [
        _Seed("rw-index", rw_index, [(0, 4096), (4096, len(rw_index) - 4096), (4096, 16)]),
        _Seed("rw-data", rw_data, [(0, 4096), (len(rw_data) - 4096, 4096), (4096, 4096)]),
    ]
    return seeds, rw_seeds


SEEDS, RW_SEEDS = _build_seeds()


def splice(seed, ops):
    """Apply splice ops (fuzz/_splice.py) to a copy of seed.blob."""
    return bytes(splice_regions(seed.blob, seed.regions, ops))


# --------------------------------------------------------------- memfds
class _MemFile:
    """One reusable memfd; its /proc path is what the code under test opens."""

    def __init__(self, name):
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self.path = f"/proc/self/fd/{self.fd}"

    def set(self, data):
        os.ftruncate(self.fd, 0)
        view = memoryview(data)
        off = 0
        while off < len(view):
            off += os.pwrite(self.fd, view[off:], off)


LAYER_FILE = _MemFile("fuzz-layer")
RW_DATA = _MemFile("fuzz-rw-data")
RW_INDEX = _MemFile("fuzz-rw-index")
# The first byte picks the mode (byte % 8), so most inputs take a structured
# path even without a corpus.
MODES = ["raw", "raw", "S", "S", "S", "Z", "Z", "R"]
# What bad bytes may raise.  The other ObdError kinds (UsageError,
# ConfigError, UnsupportedError) mean the harness or the code misused an API,
# so they are findings here too.
BAD_INPUT = (FormatError, ReadError)
_runs = 0
_fd_baseline = None


def _read_checks(img, recs, data):
    """Read the image at a few of its records and at input-derived offsets;
    returns what was read."""
    got = []
    vsize = img.virtual_size
    for r in recs[::max(1, len(recs) // 4)][:5]:
        off, length = r[0] * 512, min(r[1] * 512, MAX_READ)
        out = img.read(off, length)
        assert len(out) == length
        got.append(out)
    tail = data[-12:].ljust(12, b"\0")
    a, b, c = struct.unpack("<IIi", tail)
    off = (a * 512) % min((vsize or (1 << 30)) + (1 << 20), 1 << 62)
    off -= off % 512
    length = 512 * (1 + b % (MAX_READ // 512))
    out = img.read(off, length)
    assert len(out) == length
    got.append(out)
    out = img.pread(abs(c) % min((vsize or 1) + 4096, 1 << 62), b % MAX_READ)
    assert len(out) <= MAX_READ
    got.append(out)
    return got


def _fuzz_layer_file(blob, data):
    LAYER_FILE.set(blob)
    lay = layer.open_layer(LAYER_FILE.path)
    try:
        assert lay.path == LAYER_FILE.path
        img = image.Image([lay])
        return _read_checks(img, lay.index.records(), data)
    finally:
        lay.close()


def _looks_wrapped(blob):
    """Would open_layer see a tar or ZFile wrapper around these bytes?"""
    if blob[:8] == zfile.MAGIC0:
        return True
    try:
        return tar.detect(lambda o, n: blob[o:o + n], len(blob), "x") is not None
    except FormatError:
        return True


def _outcome(blob, data):
    try:
        return ("ok", _fuzz_layer_file(blob, data))
    except BAD_INPUT as e:
        return ("error", type(e).__name__, str(e))


def _fuzz_rw(sel, ops, data):
    idx, dat = RW_SEEDS
    if sel & 1:
        dat_blob, idx_blob = splice(dat, ops), idx.blob
    else:
        dat_blob, idx_blob = dat.blob, splice(idx, ops)
    RW_DATA.set(dat_blob)
    RW_INDEX.set(idx_blob)
    up = rw.RWLayer.open(RW_DATA.path, RW_INDEX.path)
    try:
        img = image.Image([], up)
        _read_checks(img, up.index.records(), data)
    finally:
        up.close()


def TestOneInput(data):
    global _runs, _fd_baseline
    mode = MODES[data[0] % len(MODES)] if data else "raw"
    sel, ops = data[1] if len(data) > 1 else 0, data[2:]
    try:
        if mode == "S":
            _fuzz_layer_file(splice(SEEDS[sel % len(SEEDS)], ops), data)
        elif mode == "Z":
            src = SEEDS[(0, 1, 5)[sel % 3]]
            plain = splice(src, ops)
            algo = zfile.ALGO_ZSTD if sel & 4 else zfile.ALGO_LZ4
            wrapped = _outcome(_zfile_bytes(plain, algo, bool(sel & 8)), data)
            if not _looks_wrapped(plain):
                direct = _outcome(plain, data)
                assert wrapped == direct, f"through a ZFile: {wrapped[:2]}, directly: {direct[:2]}"
        elif mode == "R":
            _fuzz_rw(sel, ops, data)
        else:
            _fuzz_layer_file(data, data)
    except BAD_INPUT as e:
        assert str(e).startswith("/proc/self/fd/"), f"error does not name the file: {e}"
    _runs += 1
    if _runs % FD_CHECK_EVERY == 0:
        n = len(os.listdir("/proc/self/fd"))
        if _fd_baseline is None:
            _fd_baseline = n
        assert n <= _fd_baseline + 2, f"descriptor leak: {n} open, {_fd_baseline} after the first check"


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
