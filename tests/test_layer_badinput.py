"""Bad input to the layer readers: every corrupted layer file gets a clear
FormatError / CorruptDataError / ReadError that names the file, the field and
(where it makes sense) the value; never a crash, a hang or wrong data.

Valid layers are made with the project's own tools (overlaybd-create,
overlaybd-commit [-z] [-t] [--seal], overlaybd-zfile) and API, then corrupted
byte by byte.  The message form is "<path>: <field> = <value>: <why>".
"""

import os
import random
import shutil
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from tcmu_obd import core
from tcmu_obd.image import rw
from tcmu_obd.format import tar, zfile
from tcmu_obd.errors import CorruptDataError, FormatError, ObdError, ReadError
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer

SPAN = 4 << 20           # every write below lies in [0, SPAN) of the virtual disk
BAD_INPUT = (FormatError, ReadError)   # CorruptDataError is a FormatError
RND = random.Random(20240611)
BLOCK_RANDOM = bytes(RND.getrandbits(8) for _ in range(32768))
AT_3M = bytes(RND.getrandbits(8) for _ in range(65536))
SPLIT = bytes(RND.getrandbits(8) for _ in range(1536))

# ZFile header/trailer fields: name -> (offset, struct format)
ZF = {"digest": (28, "<I"), "flags": (32, "<Q"), "index_offset": (40, "<Q"), "index_size": (48, "<Q"),
      "original_file_size": (56, "<Q"), "index_crc": (64, "<I"), "block_size": (72, "<I"),
      "algo": (76, "<B"), "verify": (88, "<B")}
# LSMT header/trailer fields
LF = {"flags": (28, "<I"), "index_offset": (32, "<Q"), "index_size": (40, "<Q"),
      "virtual_size": (48, "<Q")}


def _tool(*args, cwd):
    """Run one of the project's console tools (falling back to -m when the
    script is not on PATH); it must succeed."""
    name = args[0]
    exe = shutil.which(name)
    module = {"overlaybd-create": "create", "overlaybd-commit": "commit", "overlaybd-zfile": "zfile"}[name]
    cmd = [exe, *args[1:]] if exe else [sys.executable, "-c",
                                        f"from tcmu_obd.cli.{module} import main; main()", *args[1:]]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, (args, res.stderr)


def _fill(data, index):
    up = rw.RWLayer.open(data, index)
    try:
        up.write(BLOCK_RANDOM, 0)
        up.write(b"A" * 4096, 1 << 20)
        up.write(SPLIT, 512)                 # splits the first record
        up.discard(2 << 20, 8192)
        up.write(AT_3M, 3 << 20)
    finally:
        up.close()


def _expected():
    out = bytearray(SPAN)
    out[0:32768] = BLOCK_RANDOM
    out[512:2048] = SPLIT
    out[1 << 20:(1 << 20) + 4096] = b"A" * 4096
    out[3 << 20:(3 << 20) + 65536] = AT_3M
    return bytes(out)


EXPECTED = _expected()


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Pristine layers: name -> path.  Tests copy them before corrupting."""
    d = tmp_path_factory.mktemp("layers")
    _tool("overlaybd-create", "data", "index", "1", cwd=d)
    _fill(d / "data", d / "index")
    _tool("overlaybd-commit", "data", "index", "plain", cwd=d)
    _tool("overlaybd-commit", "-z", "data", "index", "zlz4", cwd=d)
    _tool("overlaybd-commit", "-z", "--algorithm", "zstd", "data", "index", "zzstd", cwd=d)
    _tool("overlaybd-commit", "-z", "-t", "data", "index", "tarz", cwd=d)
    _tool("overlaybd-zfile", "plain", "ztrailer", cwd=d)            # header not overwritten
    shutil.copy(d / "data", d / "sdata")
    shutil.copy(d / "index", d / "sindex")
    _tool("overlaybd-commit", "--seal", "sdata", "sindex", cwd=d)
    os.rename(d / "sdata", d / "sealed")
    # a no-verify ZFile (the tools always set verify; the API can clear it)
    with open(d / "plain", "rb") as src, open(d / "znoverify", "wb") as dst:
        w = zfile.ZFileWriter(dst, zfile.ALGO_LZ4, 4096, verify=False)
        w.write(src.read())
        w.close()
    names = ["plain", "zlz4", "zzstd", "tarz", "ztrailer", "sealed", "znoverify", "data", "index"]
    return {n: d / n for n in names}


def read_all(path, span=SPAN):
    with open_layer(path) as lay:
        return Image([lay]).read(0, span)


def copy(built, name, tmp_path, new=None):
    dst = tmp_path / (new or name)
    shutil.copy(built[name], dst)
    return dst


def assert_bad(path, field, value=None, cls=FormatError, read=True, exact=None):
    """Opening (and reading) `path` raises `cls` whose message names the
    file, the field and the value."""
    with pytest.raises(BAD_INPUT) as info:
        if read:
            read_all(path)
        else:
            open_layer(path).close()
    err = info.value
    msg = str(err)
    assert isinstance(err, cls), (type(err), msg)
    if exact is not None:
        assert type(err) is exact, (type(err), msg)
    assert msg.startswith(f"{path}: "), msg
    assert field in msg, (field, msg)
    if value is not None:
        assert str(value) in msg, (value, msg)
    return err


# --------------------------------------------------------------- byte editing
def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, size):
    os.truncate(path, size)


def lsmt_set(path, where, **fields):
    """Set fields of the LSMT header ('header') or trailer ('trailer') of a raw file."""
    at = 0 if where == "header" else os.path.getsize(path) - 4096
    for name, value in fields.items():
        off, fmt = LF[name]
        patch(path, at + off, struct.pack(fmt, value))


def lsmt_get(path, where, name):
    at = 0 if where == "header" else os.path.getsize(path) - 4096
    off, fmt = LF[name]
    with open(path, "rb") as f:
        f.seek(at + off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def records_raw(path):
    ioff = lsmt_get(path, "trailer", "index_offset")
    n = lsmt_get(path, "trailer", "index_size")
    with open(path, "rb") as f:
        f.seek(ioff)
        return ioff, [struct.unpack("<QQ", f.read(16)) for _ in range(n)]


def set_record(path, i, offset, length, moffset, zeroed=0):
    ioff = lsmt_get(path, "trailer", "index_offset")
    patch(path, ioff + 16 * i, rw.encode_record(offset, length, moffset, zeroed))


class Z:
    """A ZFile inside a file (at byte `base`, after a tar header or not)."""

    def __init__(self, path, base=0):
        self.path, self.base = path, base
        self.buf = bytearray(open(path, "rb").read())
        self.end = len(self.buf)
        self.head = base
        self.tail = self.end - 512
        flags = self.get("flags", self.head)
        self.info_at = self.head if flags & zfile.F_OVERWRITE else self.tail

    @classmethod
    def of(cls, path):
        blob = open(path, "rb").read()
        found = tar.detect(lambda o, n: blob[o:o + n], len(blob), path)
        if found is None:
            return cls(path)
        z = cls(path, found[0])
        z.end = found[0] + found[1]
        z.tail = z.end - 512
        z.info_at = z.head if z.get("flags", z.head) & zfile.F_OVERWRITE else z.tail
        return z

    def get(self, name, at=None):
        off, fmt = ZF[name]
        at = self.info_at if at is None else at
        return struct.unpack_from(fmt, self.buf, at + off)[0]

    def set(self, name, value, both=True, redigest=True):
        off, fmt = ZF[name]
        for at in ((self.head, self.tail) if both else (self.info_at,)):
            struct.pack_into(fmt, self.buf, at + off, value)
        if redigest:
            self.redigest()
        return self

    def redigest(self):
        for at in (self.head, self.tail):
            block = bytearray(self.buf[at:at + 512])
            block[28:32] = bytes(4)
            struct.pack_into("<I", self.buf, at + 28, core.crc32c(bytes(block)))

    @property
    def table(self):
        ioff, n = self.get("index_offset"), self.get("index_size")
        return list(struct.unpack_from(f"<{n}I", self.buf, self.base + ioff))

    def set_table(self, entries):
        ioff = self.get("index_offset")
        raw = struct.pack(f"<{len(entries)}I", *entries)
        self.buf[self.base + ioff:self.base + ioff + len(raw)] = raw
        self.set("index_crc", core.crc32c(raw))
        return self

    def block(self, k):
        """(absolute start, stored length) of block k."""
        t = self.table
        return self.base + 512 + sum(t[:k]), t[k]

    def fix_block_crc(self, k):
        start, length = self.block(k)
        crc = core.crc32c(bytes(self.buf[start:start + length - 4]), 100007)
        struct.pack_into("<I", self.buf, start + length - 4, crc)
        return self

    def save(self, path=None):
        path = path or self.path
        with open(path, "wb") as f:
            f.write(self.buf)
        return path


def data_block(path, voff):
    """The ZFile block that holds virtual byte voff of the layer at path."""
    with open_layer(path) as lay:
        for off, length, moff, zeroed, _ in lay.index.records():
            if off * 512 <= voff < (off + length) * 512 and not zeroed:
                raw = moff * 512 + voff - off * 512
                return raw // lay.zinfo.block_size
    raise AssertionError(f"no data at {voff}")


def zfile_of(plain_bytes, path, algo=zfile.ALGO_LZ4, bs=4096, verify=True, overwrite=True, wrap_tar=False):
    """Write plain LSMT bytes as a ZFile (optionally tar-wrapped) with the API."""
    with open(path, "w+b") as f:
        if wrap_tar:
            t = tar.TarWriter(f, mode=0o100644, uname=b"root", gname=b"root")
            sink = _TarSink(t, f)
        else:
            t, sink = None, f
        w = zfile.ZFileWriter(sink, algo, bs, verify, overwrite)
        w.write(plain_bytes)
        w.close()
        if t is not None:
            t.close()
    return path


class _TarSink:
    def __init__(self, writer, f):
        self.writer, self.f = writer, f

    def write(self, data):
        return self.writer.write(data)

    def seek(self, pos):
        self.f.seek(tar.HEADER_SIZE + pos)


# ================================================================ sanity
@pytest.mark.parametrize("name", ["plain", "zlz4", "zzstd", "tarz", "ztrailer", "sealed", "znoverify"])
def test_valid_layers_read_back(built, name):
    assert read_all(built[name]) == EXPECTED


def test_rw_pair_reads_back(built, tmp_path):
    d, i = copy(built, "data", tmp_path), copy(built, "index", tmp_path)
    up = rw.RWLayer.open(d, i)
    try:
        assert Image([], up).read(0, SPAN) == EXPECTED
    finally:
        up.close()


# ================================================================ truncation
def _cut_points(path):
    """Cut points inside every section of the (possibly wrapped) layer."""
    size = os.path.getsize(path)
    pts = set(range(0, size, 512)) | {1, 23, 24, 100, 389, 390, 511, size - 1}
    z = Z.of(path)
    if zfile.is_zfile(bytes(z.buf[z.base:z.base + 512])):
        b, ioff, n = z.base, z.get("index_offset"), z.get("index_size")
        pts |= {b + 1, b + 511, b + 512, b + 513, b + ioff - 1, b + ioff, b + ioff + 1,
                b + ioff + 2 * n, b + ioff + 4 * n - 1, z.end - 512, z.end - 511, z.end - 100, z.end - 1,
                z.end, z.end + 1}
        for k in range(min(n, 12)):
            start, length = z.block(k)
            pts |= {start + length // 2, start + length - 4, start + length - 1}
    else:
        ioff = lsmt_get(path, "trailer", "index_offset")
        pts |= {4095, 4096, 4097, 8000, ioff - 1, ioff, ioff + 1, ioff + 16, ioff + 17,
                size - 4097, size - 4096, size - 4095, size - 2000}
    return sorted(p for p in pts if 0 <= p < size)


def assert_says_truncated(msg, cut):
    """A cut layer is reported as truncated; only a cut so short that no
    format can be recognised may say "too short" instead."""
    if "truncated" in msg:
        return
    assert cut < 4096 and "too short" in msg, (cut, msg)


@pytest.mark.parametrize("name", ["plain", "zlz4", "zzstd", "tarz", "ztrailer", "sealed"])
def test_truncation_never_returns_wrong_data(built, tmp_path, name):
    src = built[name]
    blob = open(src, "rb").read()
    path = tmp_path / name
    raised = 0
    points = _cut_points(src)
    assert len(points) > 40
    for cut in points:
        path.write_bytes(blob[:cut])
        try:
            got = read_all(path)
        except BAD_INPUT as e:
            assert str(e).startswith(f"{path}: "), (cut, str(e))
            assert_says_truncated(str(e), cut)
            raised += 1
            continue
        except ObdError as e:               # any other tcmu_obd error is a bug here
            pytest.fail(f"cut at {cut}: unexpected {type(e).__name__}: {e}")
        assert got == EXPECTED, f"cut at {cut} of {len(blob)} read back wrong data"
    # only cuts inside the tar's end-of-archive blocks may still open
    assert raised >= len(points) - (16 if name == "tarz" else 0)


@pytest.mark.parametrize("name", ["plain", "zlz4", "zzstd", "tarz", "ztrailer", "sealed", "znoverify"])
def test_truncation_property_any_length(built, tmp_path_factory, name):
    """Property: a valid layer cut to any length opens as the same data (only
    inside the tar's end-of-archive blocks, after the payload) or fails with a
    FormatError that says "truncated" ("too short" below 4 KiB)."""
    blob = open(built[name], "rb").read()
    path = tmp_path_factory.mktemp("cut") / name
    payload_end = len(blob)
    if name == "tarz":
        payload_end = sum(tar.detect(lambda o, n: blob[o:o + n], len(blob), "x"))

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.integers(0, len(blob) - 1))
    def check(cut):
        path.write_bytes(blob[:cut])
        try:
            got = read_all(path)
        except FormatError as e:
            assert str(e).startswith(f"{path}: "), (cut, str(e))
            assert_says_truncated(str(e), cut)
            return
        assert cut >= payload_end and got == EXPECTED, (cut, len(blob))
    check()


@pytest.mark.parametrize("where,cut,field", [
    ("header", 100, "file size"), ("header", 4095, "file size"), ("data", 20000, "trailer magic"),
    ("index", None, "trailer magic"), ("trailer", -1, "trailer magic"), ("trailer", -4000, "trailer magic")])
def test_truncated_plain_names_field(built, tmp_path, where, cut, field):
    path = copy(built, "plain", tmp_path)
    size = os.path.getsize(path)
    if cut is None:
        cut = lsmt_get(path, "trailer", "index_offset") + 100
    elif cut < 0:
        cut = size + cut
    truncate(path, cut)
    err = assert_bad(path, field, cut if field == "file size" else None)
    assert "truncated" in str(err)


@pytest.mark.parametrize("name", ["zlz4", "ztrailer"])
@pytest.mark.parametrize("where", ["blocks", "jump table", "trailer"])
def test_truncated_zfile_names_field(built, tmp_path, name, where):
    path = copy(built, name, tmp_path)
    z = Z.of(path)
    ioff, n = z.get("index_offset"), z.get("index_size")
    cut = {"blocks": 2000, "jump table": ioff + 2 * n, "trailer": z.end - 10}[where]
    truncate(path, cut)
    field = "zfile size" if name == "zlz4" else "zfile trailer magic"
    err = assert_bad(path, field, cut if name == "zlz4" else None)
    assert "truncated" in str(err)


# ================================================================ LSMT header/trailer
def test_wrong_lsmt_header_magic(built, tmp_path):
    path = copy(built, "plain", tmp_path)
    patch(path, 0, b"X")
    assert_bad(path, "header magic", "58534d54")


def test_wrong_lsmt_trailer_magic(built, tmp_path):
    path = copy(built, "plain", tmp_path)
    patch(path, os.path.getsize(path) - 4096 + 9, b"\0")
    assert_bad(path, "trailer magic")


@pytest.mark.parametrize("flags,why", [(0x06, "HEADER"), (0x05, "TYPE_DATA")])
def test_lsmt_header_flags(built, tmp_path, flags, why):
    path = copy(built, "plain", tmp_path)
    lsmt_set(path, "header", flags=flags)
    err = assert_bad(path, "header flags", flags)
    assert why in str(err)


@pytest.mark.parametrize("flags", [0x07, 0x02, 0x04, 0x00, 0x03])
def test_lsmt_trailer_flags(built, tmp_path, flags):
    path = copy(built, "plain", tmp_path)
    lsmt_set(path, "trailer", flags=flags)
    assert_bad(path, "trailer flags", flags)


def test_lsmt_trailer_flags_extra_bits_ignored(built, tmp_path):
    path = copy(built, "plain", tmp_path)
    lsmt_set(path, "trailer", flags=0x06 | 0x08 | 0x20)
    assert read_all(path) == EXPECTED


def test_index_size_over_limit(built, tmp_path):
    path = copy(built, "plain", tmp_path)
    lsmt_set(path, "trailer", index_size=1_000_001)
    assert_bad(path, "trailer index_size", 1000001)


@pytest.mark.parametrize("extra", [1, 256, 10**6 - 256])
def test_index_size_past_trailer(built, tmp_path, extra):
    path = copy(built, "plain", tmp_path)
    n = lsmt_get(path, "trailer", "index_size")
    lsmt_set(path, "trailer", index_size=n + extra)
    assert_bad(path, "trailer index_size", n + extra)


@pytest.mark.parametrize("delta", [1, 100, -1, 511])
def test_index_offset_misaligned(built, tmp_path, delta):
    path = copy(built, "plain", tmp_path)
    ioff = lsmt_get(path, "trailer", "index_offset")
    lsmt_set(path, "trailer", index_offset=ioff + delta)
    assert_bad(path, "trailer index_offset", ioff + delta)


@pytest.mark.parametrize("value", [0, 512, 2**64 - 512, None])
def test_index_offset_out_of_range(built, tmp_path, value):
    path = copy(built, "plain", tmp_path)
    if value is None:
        value = os.path.getsize(path)          # aligned, but past the trailer
    lsmt_set(path, "trailer", index_offset=value)
    assert_bad(path, "trailer index_offset", value)


def test_index_offset_pointing_into_data(built, tmp_path):
    """An aligned index_offset inside the data area: the 'records' there are
    random bytes; they must be rejected, not read."""
    path = copy(built, "plain", tmp_path)
    lsmt_set(path, "trailer", index_offset=8192, index_size=16)
    assert_bad(path, "index record")


def test_overlapping_records(built, tmp_path):
    path = copy(built, "plain", tmp_path)
    _, recs = records_raw(path)
    off0 = recs[0][0] & ((1 << 50) - 1)
    len0 = recs[0][0] >> 50
    moff1 = recs[1][1] & ((1 << 55) - 1)
    set_record(path, 1, off0 + len0 - 1, 1, moff1)
    assert_bad(path, "index record 1 offset", off0 + len0 - 1)


def test_unsorted_records(built, tmp_path):
    path = copy(built, "plain", tmp_path)
    _, recs = records_raw(path)
    moff1 = recs[1][1] & ((1 << 55) - 1)
    set_record(path, 1, 0, 1, moff1)           # starts before record 0 ends
    assert_bad(path, "index record 1 offset")


@pytest.mark.parametrize("case", ["data-low", "data-high", "data-end", "zeroed-low", "zeroed-high"])
def test_moffset_out_of_range(built, tmp_path, case):
    path = copy(built, "plain", tmp_path)
    ioff, recs = records_raw(path)
    hi = ioff // 512
    if case == "data-low":
        set_record(path, 0, 0, 64, 7)
        rec, value = 0, 7
    elif case == "data-high":
        set_record(path, 0, 0, 64, hi)
        rec, value = 0, hi
    elif case == "data-end":
        set_record(path, 0, 0, 64, hi - 63)   # starts inside, ends one sector past
        rec, value = 0, hi - 63
    else:
        zi = next(i for i, r in enumerate(recs) if (r[1] >> 55) & 1)
        w0 = recs[zi][0]
        value = 7 if case == "zeroed-low" else hi + 1
        set_record(path, zi, w0 & ((1 << 50) - 1), w0 >> 50, value, zeroed=1)
        rec = zi
    err = assert_bad(path, f"index record {rec} moffset", value)
    assert ("zeroed" if case.startswith("zeroed") else "data") in str(err)


def test_zeroed_moffset_at_index_offset_is_valid(built, tmp_path):
    path = copy(built, "plain", tmp_path)
    ioff, recs = records_raw(path)
    zi = next(i for i, r in enumerate(recs) if (r[1] >> 55) & 1)
    w0 = recs[zi][0]
    set_record(path, zi, w0 & ((1 << 50) - 1), w0 >> 50, ioff // 512, zeroed=1)
    assert read_all(path) == EXPECTED


def test_lsmt_errors_inside_zfile_and_tar_name_the_outer_file(built, tmp_path):
    """The same corrupt LSMT, wrapped in a ZFile (LZ4, ZSTD) and in tar+ZFile:
    the message names the layer file the user gave."""
    plain = copy(built, "plain", tmp_path)
    ioff, recs = records_raw(plain)
    set_record(plain, 0, 0, 64, ioff // 512)
    blob = plain.read_bytes()
    for algo in (zfile.ALGO_LZ4, zfile.ALGO_ZSTD):
        for wrap in (False, True):
            path = zfile_of(blob, tmp_path / f"w{algo}{wrap}", algo=algo, wrap_tar=wrap)
            assert_bad(path, "index record 0 moffset", ioff // 512)


# ================================================================ ZFile
def test_wrong_zfile_magic(built, tmp_path):
    """A broken ZFile magic makes the file 'not a ZFile'; as a layer it then
    fails the LSMT magic; open_backing names the ZFile magic."""
    path = copy(built, "zlz4", tmp_path)
    patch(path, 1, b"f")
    assert_bad(path, "header magic", "5a66")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(FormatError) as info:
            zfile.open_backing(fd, 0, os.path.getsize(path), str(path))
        assert str(info.value).startswith(f"{path}: zfile header magic = 5a66")
    finally:
        os.close(fd)


def test_wrong_zfile_trailer_magic(built, tmp_path):
    path = copy(built, "ztrailer", tmp_path)
    patch(path, os.path.getsize(path) - 512 + 3, b"x")
    assert_bad(path, "zfile trailer magic")


@pytest.mark.parametrize("flags", [0x17, 0x12, 0x14, 0x00])
def test_zfile_trailer_flags(built, tmp_path, flags):
    path = copy(built, "ztrailer", tmp_path)
    Z(path).set("flags", flags, both=False).save()
    assert_bad(path, "zfile trailer flags", flags)


def test_zfile_header_flags_without_header_bit(built, tmp_path):
    path = copy(built, "zlz4", tmp_path)
    z = Z(path)
    struct.pack_into("<Q", z.buf, 32, z.get("flags", 0) & ~1)
    z.redigest()
    z.save()
    assert_bad(path, "zfile header flags")


def test_zfile_index_comp_flag(built, tmp_path):
    path = copy(built, "zlz4", tmp_path)
    z = Z(path)
    z.set("flags", z.get("flags") | zfile.F_IDX_COMP, both=False).save()
    assert_bad(path, "flags", "compressed jump table")


def test_zfile_header_digest_mismatch(built, tmp_path):
    path = copy(built, "zlz4", tmp_path)
    assert Z(path).get("flags", 0) & zfile.F_DIGEST
    patch(path, 300, b"\x01")                  # padding byte: only the digest sees it
    assert_bad(path, "zfile header digest", cls=CorruptDataError)


def test_zfile_header_digest_ignored_without_flag(built, tmp_path):
    path = copy(built, "zlz4", tmp_path)
    z = Z(path)
    struct.pack_into("<Q", z.buf, 32, z.get("flags", 0) & ~zfile.F_DIGEST)
    struct.pack_into("<I", z.buf, 28, 0xDEADBEEF)
    z.save()
    assert read_all(path) == EXPECTED


@pytest.mark.parametrize("name,where", [("zlz4", "header"), ("ztrailer", "trailer")])
def test_zfile_index_crc_mismatch(built, tmp_path, name, where):
    path = copy(built, name, tmp_path)
    z = Z(path)
    z.set("index_crc", z.get("index_crc") ^ 1).save()
    assert_bad(path, f"zfile {where} index_crc", z.get("index_crc"), cls=CorruptDataError)


def test_zfile_jump_table_changed_under_index_crc(built, tmp_path):
    path = copy(built, "zlz4", tmp_path)
    z = Z(path)
    patch(path, z.get("index_offset") + 1, b"\x7f")
    assert_bad(path, "zfile header index_crc", cls=CorruptDataError)


@pytest.mark.parametrize("name,value,ok_min", [("zlz4", 0, 5), ("zlz4", 1, 5), ("zlz4", 4, 5),
                                               ("znoverify", 0, 1)])
def test_zfile_short_jump_table_entry(built, tmp_path, name, value, ok_min):
    path = copy(built, name, tmp_path)
    z = Z(path)
    t = z.table
    t[2] = value
    z.set_table(t).save()
    err = assert_bad(path, "jump table entry 2", value)
    assert f"{ok_min}.." in str(err)


def test_zfile_jump_table_sum_past_index(built, tmp_path):
    path = copy(built, "zlz4", tmp_path)
    z = Z(path)
    t = z.table
    t[-1] += 600                              # still a plausible block length
    z.set_table(t).save()
    err = assert_bad(path, "jump table")
    assert "past the jump table" in str(err)


def test_zfile_jump_table_entry_too_long(built, tmp_path):
    path = copy(built, "zlz4", tmp_path)
    z = Z(path)
    t = z.table
    t[0] = 1 << 31
    z.set_table(t).save()
    assert_bad(path, "jump table entry 0", 1 << 31)


@pytest.mark.parametrize("name", ["zlz4", "zzstd", "tarz"])
def test_zfile_block_crc_mismatch_on_read(built, tmp_path, name):
    path = copy(built, name, tmp_path)
    k = data_block(path, 8192)
    z = Z.of(path)
    start, length = z.block(k)
    z.buf[start + length // 2] ^= 0x40        # one payload byte
    z.save()
    with open_layer(path) as lay:             # the index blocks are intact: open works
        img = Image([lay])
        assert img.read(1 << 20, 4096) == b"A" * 4096
        assert img.read(3 << 20, 65536) == AT_3M
        with pytest.raises(CorruptDataError) as info:
            img.read(8192, 4096)
        msg = str(info.value)
        assert msg.startswith(f"{path}: zfile block {k} crc = "), msg
        assert img.read(16384, 4096) == EXPECTED[16384:20480]    # and a later read still works


@pytest.mark.parametrize("name", ["zlz4", "zzstd"])
def test_zfile_undecodable_block_with_valid_crc(built, tmp_path, name):
    path = copy(built, name, tmp_path)
    k = data_block(path, 8192)
    z = Z(path)
    start, length = z.block(k)
    z.buf[start:start + length - 4] = b"\xff" * (length - 4)
    z.fix_block_crc(k).save()
    with open_layer(path) as lay:
        img = Image([lay])
        with pytest.raises(CorruptDataError) as info:
            img.read(8192, 512)
        assert str(info.value).startswith(f"{path}: zfile block {k} = ")
        assert "decompress" in str(info.value)
        assert img.read(1 << 20, 4096) == b"A" * 4096


def assemble_zfile(stored, original_size, algo=zfile.ALGO_LZ4, bs=4096):
    """A ZFile (trailer only) around already stored blocks (payload + CRC)."""
    table = struct.pack(f"<{len(stored)}I", *map(len, stored))
    body = b"".join(stored)
    info = zfile.ZHeader(zfile.F_HEADER | zfile.F_DATA | zfile.F_DIGEST, block_size=bs, algo=algo)
    head = info.pack()
    info.flags = zfile.F_DATA | zfile.F_SEALED | zfile.F_DIGEST
    info.index_offset, info.index_size = 512 + len(body), len(stored)
    info.original_file_size, info.index_crc = original_size, core.crc32c(table)
    return head + body + table + info.pack()


@pytest.mark.parametrize("algo", [zfile.ALGO_LZ4, zfile.ALGO_ZSTD])
@pytest.mark.parametrize("short", [True, False])
def test_zfile_block_decodes_to_wrong_size(built, tmp_path, algo, short):
    """A well-formed block (valid CRC, valid LZ4/ZSTD) that decodes to fewer
    or more bytes than the block size: CorruptDataError on read, not a
    short or overlong copy."""
    plain = built["plain"].read_bytes()
    blocks = [plain[i:i + 4096] for i in range(0, len(plain), 4096)]
    k = 3                                      # virtual [8192, 12288)
    stored = []
    for i, blk in enumerate(blocks):
        if i == k:
            blk = blk[:1000] if short else b"\x22" * 5000
        out, _ = core.compress_blocks(algo, blk, 8192, True)
        stored.append(out)
    path = tmp_path / "wrongsize"
    path.write_bytes(assemble_zfile(stored, len(plain), algo))
    with open_layer(path) as lay:
        img = Image([lay])
        assert img.read(0, 8192) == EXPECTED[:8192]
        with pytest.raises(CorruptDataError) as info:
            img.read(8192, 4096)
        assert str(info.value).startswith(f"{path}: zfile block {k} = ")


@pytest.mark.parametrize("bs", [5000, 4095, 131072, 0, 1 << 31])
def test_zfile_block_size_bad(built, tmp_path, bs):
    path = copy(built, "zlz4", tmp_path)
    Z(path).set("block_size", bs).save()
    assert_bad(path, "block_size", bs)


def test_zfile_block_size_other_power_of_two(built, tmp_path):
    path = copy(built, "zlz4", tmp_path)
    Z(path).set("block_size", 8192).save()
    assert_bad(path, "original_file_size")


@pytest.mark.parametrize("algo", [0, 3, 255])
def test_zfile_algo_bad(built, tmp_path, algo):
    path = copy(built, "zlz4", tmp_path)
    Z(path).set("algo", algo).save()
    assert_bad(path, "algo", algo)


def test_zfile_algo_swapped(built, tmp_path):
    """An LZ4 file labelled ZSTD decodes nothing: CorruptDataError at open
    (the LSMT header block), naming block 0."""
    path = copy(built, "zlz4", tmp_path)
    Z(path).set("algo", zfile.ALGO_ZSTD).save()
    assert_bad(path, "zfile block 0", cls=CorruptDataError)


@pytest.mark.parametrize("delta", [4096, -4096, 1 << 40, 2**64 - 1])
def test_zfile_original_size_inconsistent(built, tmp_path, delta):
    path = copy(built, "zlz4", tmp_path)
    z = Z(path)
    osize = z.get("original_file_size")
    value = delta if delta == 2**64 - 1 else osize + delta
    z.set("original_file_size", value).save()
    assert_bad(path, "original_file_size", value)


@pytest.mark.parametrize("delta", [-1, -511, 1])
def test_zfile_original_size_off_inside_last_block(built, tmp_path, delta):
    """Same block count, but the size no longer matches the data: an error,
    never different bytes."""
    path = copy(built, "zlz4", tmp_path)
    z = Z(path)
    z.set("original_file_size", z.get("original_file_size") + delta).save()
    with pytest.raises(BAD_INPUT) as info:
        read_all(path)
    assert str(info.value).startswith(f"{path}: ")


def test_zfile_huge_original_size_with_no_blocks(tmp_path):
    """Regression: original_file_size near 2**64 with zero blocks made the
    core's u64 block count wrap to 0 and read past its block table."""
    path = tmp_path / "empty.zfile"
    head = zfile.ZHeader(zfile.F_HEADER | zfile.F_DATA | zfile.F_OVERWRITE | zfile.F_DIGEST, 512, 0,
                         2**64 - 1, core.crc32c(b""))
    tail = zfile.ZHeader(zfile.F_DATA | zfile.F_SEALED | zfile.F_DIGEST, 512, 0, 2**64 - 1, core.crc32c(b""))
    path.write_bytes(head.pack() + tail.pack())
    assert_bad(path, "zfile header original_file_size", 2**64 - 1)


@pytest.mark.parametrize("name", ["zlz4", "ztrailer"])
def test_zfile_index_size_bad(built, tmp_path, name):
    where = "header" if name == "zlz4" else "trailer"
    path = copy(built, name, tmp_path)
    Z(path).set("index_size", 1_000_000_001).save()
    assert_bad(path, f"zfile {where} index_size", 1000000001)
    path = copy(built, name, tmp_path, "b")
    z = Z(path)
    z.set("index_size", z.get("index_size") + 2).save()
    # a header with the jump table running past the end contradicts its own
    # original_file_size (so it is damaged, not cut short)
    assert_bad(path, f"zfile {where} original_file_size" if name == "zlz4" else f"zfile {where} index_offset")


@pytest.mark.parametrize("value", [0, 100, 2**63])
def test_zfile_index_offset_out_of_range(built, tmp_path, value):
    path = copy(built, "zlz4", tmp_path)
    Z(path).set("index_offset", value).save()
    assert_bad(path, "zfile header index_offset", value)


def test_zfile_incompressible_64k_lz4(tmp_path):
    """A 64 KiB LZ4 block of random data is stored larger than the block
    (overlaybd's 64 KiB read buffer fails on it); it must read back."""
    payload = random.Random(5).randbytes(3 * 65536)
    _tool("overlaybd-create", "d", "i", "1", cwd=tmp_path)
    up = rw.RWLayer.open(tmp_path / "d", tmp_path / "i")
    up.write(payload, 1 << 20)
    up.close()
    _tool("overlaybd-commit", "-z", "--bs", "64", "d", "i", "big", cwd=tmp_path)
    z = Z(tmp_path / "big")
    assert z.get("block_size") == 65536 and z.get("algo") == zfile.ALGO_LZ4
    assert max(z.table) > 65536 + 4
    with open_layer(tmp_path / "big") as lay:
        img = Image([lay])
        assert img.read(1 << 20, len(payload)) == payload
        assert img.read((1 << 20) + 65536 - 512, 1024) == payload[65536 - 512:65536 + 512]
        lay.backing.verify_all()


# ================================================================ tar
def _tar_patch(path, offset, data, fix_header_at=None):
    blob = bytearray(path.read_bytes())
    blob[offset:offset + len(data)] = data
    if fix_header_at is not None:
        h = blob[fix_header_at:fix_header_at + 512]
        h[148:156] = b" " * 8
        blob[fix_header_at + 148:fix_header_at + 156] = b"%6o \0" % sum(h)
    path.write_bytes(bytes(blob))


def test_tar_bad_pax_size(built, tmp_path):
    path = copy(built, "tarz", tmp_path)
    rec = path.read_bytes()[512:1024]
    value = rec.split(b"size=")[1].split(b"\n")[0]
    _tar_patch(path, 512 + rec.index(b"size=") + 5, b"x" * len(value))
    assert_bad(path, "pax size", "78" * len(value))


def test_tar_pax_size_past_end(built, tmp_path):
    path = copy(built, "tarz", tmp_path)
    rec = path.read_bytes()[512:1024]
    value = rec.split(b"size=")[1].split(b"\n")[0]
    big = b"9" * len(value)
    _tar_patch(path, 512 + rec.index(b"size=") + 5, big)
    assert_bad(path, "size", int(big))


def test_tar_bad_pax_record_length(built, tmp_path):
    path = copy(built, "tarz", tmp_path)
    _tar_patch(path, 512, b"99")
    assert_bad(path, "pax record")


def test_tar_entry_checksum(built, tmp_path):
    path = copy(built, "tarz", tmp_path)
    _tar_patch(path, 1024 + 148, b"000001 \0")
    assert_bad(path, "chksum")


def test_tar_entry_typeflag(built, tmp_path):
    path = copy(built, "tarz", tmp_path)
    _tar_patch(path, 1024 + 156, b"5", fix_header_at=1024)
    assert_bad(path, "typeflag")


def test_tar_unfinished_writer(built, tmp_path):
    path = tmp_path / "unfinished"
    with open(path, "w+b") as f:
        t = tar.TarWriter(f)
        t.write(built["zlz4"].read_bytes())      # never closed
    assert_bad(path, "magic", b"xxtar".hex())


# ================================================================ RW pair
def _rw(built, tmp_path):
    return copy(built, "data", tmp_path), copy(built, "index", tmp_path)


def _rw_read(d, i):
    up = rw.RWLayer.open(d, i)
    try:
        return Image([], up).read(0, SPAN)
    finally:
        up.close()


def assert_rw_bad(d, i, path, field, value=None):
    with pytest.raises(FormatError) as info:
        _rw_read(d, i)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert field in msg, msg
    if value is not None:
        assert str(value) in msg, msg
    return info.value


@pytest.mark.parametrize("flags", [0x03, 0x05, 0x00, 0x07, 0x02])
def test_rw_index_wrong_flags(built, tmp_path, flags):
    d, i = _rw(built, tmp_path)
    lsmt_set(i, "header", flags=flags)
    assert_rw_bad(d, i, i, "header flags", flags)


@pytest.mark.parametrize("value", [0, 4095, 8192, 512])
def test_rw_index_offset_not_4096(built, tmp_path, value):
    d, i = _rw(built, tmp_path)
    lsmt_set(i, "header", index_offset=value)
    assert_rw_bad(d, i, i, "header index_offset", value)


def test_rw_index_wrong_magic(built, tmp_path):
    d, i = _rw(built, tmp_path)
    patch(i, 2, b"?")
    assert_rw_bad(d, i, i, "header magic")


@pytest.mark.parametrize("flags", [0x02, 0x00, 0x12])
def test_rw_data_header_without_header_bit(built, tmp_path, flags):
    d, i = _rw(built, tmp_path)
    lsmt_set(d, "header", flags=flags)
    assert_rw_bad(d, i, d, "header flags", flags)


def test_rw_data_wrong_magic(built, tmp_path):
    d, i = _rw(built, tmp_path)
    patch(d, 20, b"\0")
    assert_rw_bad(d, i, d, "header magic")


@pytest.mark.parametrize("size", [0, 100, 1000, 4095])
def test_rw_files_shorter_than_header(built, tmp_path, size):
    """Regression: an index file of 390..4095 bytes raised OSError (EINVAL)."""
    d, i = _rw(built, tmp_path)
    truncate(i, size)
    err = assert_rw_bad(d, i, i, "header" if size < 390 else "file size", size)
    assert isinstance(err, FormatError)
    d, i = _rw(built, tmp_path)
    truncate(d, size)
    assert_rw_bad(d, i, d, "header" if size < 390 else "file size", size)


@pytest.mark.parametrize("cut", [4096, 5000, 20000, None])
def test_rw_data_file_truncated(built, tmp_path, cut):
    d, i = _rw(built, tmp_path)
    size = os.path.getsize(d)
    truncate(d, size - 1 if cut is None else cut)
    err = assert_rw_bad(d, i, i, "moffset")
    assert str(d) in str(err)                  # the why names the data file too


def test_rw_torn_index_record_is_ignored(built, tmp_path):
    d, i = _rw(built, tmp_path)
    with open(i, "ab") as f:
        f.write(b"\x01" * 9)                    # a crash in the middle of an append
    assert _rw_read(d, i) == EXPECTED


def test_rw_torn_data_append_then_write(built, tmp_path):
    """Regression: after a torn payload append the data file size is not
    512-aligned; the next write must still land where its record points."""
    d, i = _rw(built, tmp_path)
    with open(d, "ab") as f:
        f.write(b"\xee" * 100)
    up = rw.RWLayer.open(d, i)
    new = bytes(RND.getrandbits(8) for _ in range(4096))
    up.write(new, 8 << 20)
    up.close()
    up = rw.RWLayer.open(d, i)
    try:
        img = Image([], up)
        assert img.read(8 << 20, 4096) == new
        assert img.read(0, SPAN) == EXPECTED
    finally:
        up.close()


def test_rw_index_record_out_of_range(built, tmp_path):
    d, i = _rw(built, tmp_path)
    with open(i, "ab") as f:
        f.write(rw.encode_record(100, 8, 1 << 40))
    assert_rw_bad(d, i, i, "moffset", 1 << 40)


# ================================================================ sealed
def test_sealed_trailer_checks(built, tmp_path):
    path = copy(built, "sealed", tmp_path)
    n = lsmt_get(path, "trailer", "index_size")
    lsmt_set(path, "trailer", index_size=n + 1000)
    assert_bad(path, "trailer index_size", n + 1000)
    path = copy(built, "sealed", tmp_path, "s2")
    lsmt_set(path, "trailer", flags=0x03)
    assert_bad(path, "trailer flags", 3)


def test_unsealed_rw_data_file_as_layer(built, tmp_path):
    path = copy(built, "data", tmp_path)
    assert_bad(path, "trailer magic")
