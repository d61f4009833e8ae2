"""Tests of tcmu_obd.format.tar: overlaybd's tar wrapper, written and detected."""

import io
import os
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_obd.format import tar
from tcmu_obd.errors import FormatError


def reader(data):
    return lambda offset, length: data[offset:offset + length]


def detect_bytes(data, path="blob"):
    return tar.detect(reader(data), len(data), path)


def write_wrapped(path, payload, chunks=1, **kw):
    kw.setdefault("mode", 0o100644)
    kw.setdefault("uname", b"root")
    kw.setdefault("gname", b"root")
    with open(path, "w+b") as f:
        with tar.TarWriter(f, **kw) as w:
            step = max(1, -(-len(payload) // chunks))
            for i in range(0, len(payload), step):
                w.write(payload[i:i + step])
    return path.read_bytes()


def hand_checksum(block):
    """Sum of the bytes with the 8-byte chksum field (148..156) as spaces."""
    return sum(block[:148]) + 8 * 32 + sum(block[156:512])


def with_checksum(block):
    block = bytearray(block)
    block[148:156] = ("%6o" % hand_checksum(block)).encode() + b" \0"
    return bytes(block)


def patch(blob, offset, new, header_at=None):
    """Overwrite bytes; if header_at is given, fix that header's checksum."""
    blob = bytearray(blob)
    blob[offset:offset + len(new)] = new
    if header_at is not None:
        blob[header_at:header_at + 512] = with_checksum(blob[header_at:header_at + 512])
    return bytes(blob)


def python_tar(fmt, payload, name="overlaybd.commit", pax_headers=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        if pax_headers:
            info.pax_headers = pax_headers
        t.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


# ---- writer round trip -----------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 511, 512, 513, 1024, 4096 + 7, 3 * 1024 * 1024 + 1])
def test_round_trip(tmp_path, n):
    payload = os.urandom(n)
    blob = write_wrapped(tmp_path / "out.tar", payload, chunks=3)
    end = (1536 + n + 511) // 512 * 512
    assert len(blob) == end + 1024
    assert blob[1536 + n:] == bytes(len(blob) - 1536 - n)
    assert detect_bytes(blob, tmp_path / "out.tar") == (1536, n)
    assert blob[1536:1536 + n] == payload
    with open(tmp_path / "out.tar", "rb") as f:
        assert tar.detect(tar.file_reader(f), len(blob), "out.tar") == (1536, n)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=3000), chunks=st.integers(1, 5))
def test_round_trip_property(tmp_path, payload, chunks):
    blob = write_wrapped(tmp_path / "p.tar", payload, chunks=chunks)
    off, size = detect_bytes(blob)
    assert (off, size) == (1536, len(payload))
    assert blob[off:off + size] == payload


@given(st.integers(0, 10**40))
def test_pax_record_length_counts_itself(size):
    record = tar.pax_size_record(size)
    length, rest = record.split(b" ", 1)
    assert int(length) == len(record)
    assert rest == b"size=%d\n" % size


def test_golden_header(tmp_path):
    """The first 1536 bytes, built field by field from image.md section 3."""
    blob = write_wrapped(tmp_path / "g.tar", b"hello")
    pax = (b"overlaybd.pax".ljust(100, b"\0")
           + bytes(8) + bytes(8) + bytes(8)          # mode, uid, gid: NUL
           + b"         11 "                         # size: len("9 size=5\n") = 9 = 0o11
           + bytes(12)                               # mtime: NUL
           + b"        "                             # chksum, filled below
           + b"x" + bytes(100)                       # typeflag, linkname
           + b"ustar\0" + b"00"
           + bytes(32) + bytes(32)                   # uname, gname
           + bytes(8) + bytes(8) + bytes(155) + bytes(12))
    entry = (b"overlaybd.commit".ljust(100, b"\0")
             + b"100644 \0" + b"     0 \0" + b"     0 \0"
             + b"          0 "                       # size field 0: real size only in PAX
             + b"          0 "                       # mtime 0
             + b"        "
             + b"0" + bytes(100)
             + b"ustar\0" + b"00"
             + b"root".ljust(32, b"\0") + b"root".ljust(32, b"\0")
             + bytes(8) + bytes(8) + bytes(155) + bytes(12))
    assert len(pax) == len(entry) == 512
    expected = with_checksum(pax) + b"9 size=5\n".ljust(512, b"\0") + with_checksum(entry)
    assert blob[:1536] == expected
    assert blob[148:156] == b"  5350 \0"          # pinned once, computed by hand_checksum
    assert blob[1536:] == b"hello" + bytes(2048 - 1541) + bytes(1024)


def test_mode_defaults_to_output_st_mode(tmp_path):
    p = tmp_path / "m.tar"
    with open(p, "w+b") as f, tar.TarWriter(f) as w:
        w.write(b"abc")
    blob = p.read_bytes()
    assert blob[1024 + 100:1024 + 108] == b"%6o \0" % os.stat(p).st_mode
    assert detect_bytes(blob) == (1536, 3)


def test_python_tarfile_reads_writer_output(tmp_path):
    payload = os.urandom(70000)
    write_wrapped(tmp_path / "t.tar", payload)
    with tarfile.open(tmp_path / "t.tar") as t:
        members = t.getmembers()
        assert [(m.name, m.size, m.isreg()) for m in members] == [
            ("overlaybd.commit", len(payload), True)]
        assert t.extractfile(members[0]).read() == payload


def test_wrap_file_and_unwrap(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"zfile" * 1000)
    tar.wrap_file(src, tmp_path / "dst")
    blob = (tmp_path / "dst").read_bytes()
    off, n = tar.unwrap(reader(blob), len(blob), "dst")
    assert blob[off:off + n] == src.read_bytes()
    assert tar.unwrap(reader(b"raw"), 3, "raw") == (0, 3)


def test_unclosed_writer_is_reported(tmp_path):
    p = tmp_path / "u.tar"
    with open(p, "w+b") as f:
        tar.TarWriter(f).write(b"x" * 1000)
    with pytest.raises(FormatError, match=r"u\.tar.*magic"):
        detect_bytes(p.read_bytes(), p)


# ---- detect on other writers' tars ------------------------------------------

def test_detect_python_ustar():
    blob = python_tar(tarfile.USTAR_FORMAT, b"q" * 700)
    assert detect_bytes(blob) == (512, 700)


def test_detect_python_pax():
    blob = python_tar(tarfile.PAX_FORMAT, b"q" * 700, name="d/" * 60 + "overlaybd.commit")
    assert blob[156:157] == b"x"
    assert detect_bytes(blob) == (1536, 700)
    assert blob[1536:2236] == b"q" * 700


def test_detect_python_pax_global_header():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as t:
        info = tarfile.TarInfo("overlaybd.commit")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    blob = buf.getvalue()
    assert blob[156:157] == b"g"
    assert detect_bytes(blob) == (1536, 3)


def test_gnu_format_is_not_a_tar_to_overlaybd():
    # GNU magic is "ustar  \0": version is not "00", so overlaybd uses the blob as is.
    assert detect_bytes(python_tar(tarfile.GNU_FORMAT, b"q")) is None


def test_pax_data_longer_than_one_block_rejected():
    blob = python_tar(tarfile.PAX_FORMAT, b"q", pax_headers={"comment": "c" * 600})
    with pytest.raises(FormatError, match="blob: typeflag"):
        detect_bytes(blob)


@pytest.mark.parametrize("data", [b"", b"\0" * 4096, b"ZFile\0\1" + bytes(600),
                                  os.urandom(2000), b"x" * 511])
def test_not_a_tar(data):
    assert detect_bytes(data) is None


# ---- corruptions ----------------------------------------------------------

@pytest.fixture
def wrapped(tmp_path):
    return write_wrapped(tmp_path / "w.tar", b"hello")


def test_bad_first_checksum_means_not_a_tar(wrapped):
    assert detect_bytes(patch(wrapped, 148, b"  5351 \0")) is None
    assert detect_bytes(patch(wrapped, 0, b"O")) is None


def test_signed_checksum_accepted():
    block = bytearray(python_tar(tarfile.USTAR_FORMAT, b"z" * 10))
    block[345] = 0xE9                                # prefix byte >= 128
    signed = hand_checksum(block) - 256
    block[148:156] = ("%06o" % signed).encode() + b"\0 "
    assert detect_bytes(bytes(block)) == (512, 10)


@pytest.mark.parametrize("record", [b"9 sizeX5\n", b"x size=5\n", b"8 size=5\n",
                                    b"99size=5\n", b"9 =size5\n", b"\0\0\0\0\0\0\0\0\0"])
def test_bad_pax_record(wrapped, record):
    with pytest.raises(FormatError, match=r"^blob: pax record"):
        detect_bytes(patch(wrapped, 512, record))


def test_bad_pax_size_value(wrapped):
    with pytest.raises(FormatError, match=r"^blob: pax size"):
        detect_bytes(patch(wrapped, 512, b"9 size=x\n"))


def test_size_past_end(wrapped):
    blob = patch(wrapped, 512, b"13 size=1600\n")
    blob = patch(blob, 124, b"         15 ", header_at=0)
    with pytest.raises(FormatError, match=r"^my/path: size = 1600.*truncated: .* needs 3136 bytes, the blob has 3072"):
        detect_bytes(blob, "my/path")
    ustar = python_tar(tarfile.USTAR_FORMAT, b"q" * 10)
    with pytest.raises(FormatError, match=r"^blob: size.*truncated"):
        detect_bytes(patch(ustar, 124, b"%011o\0" % 10**6, header_at=0))


@pytest.mark.parametrize("field", [b"0000000001x\0", b"\x80\0\0\0\0\0\0\0\0\0\0\1",
                                   b"12 34       "])
def test_bad_octal_size(wrapped, field):
    with pytest.raises(FormatError, match=r"^blob: size"):
        detect_bytes(patch(wrapped, 1024 + 124, field, header_at=1024))
    ustar = python_tar(tarfile.USTAR_FORMAT, b"q")
    with pytest.raises(FormatError, match=r"^blob: size"):
        detect_bytes(patch(ustar, 124, field, header_at=0))


@pytest.mark.parametrize("flag", [b"5", b"2", b"1", b"7", b"S"])
def test_wrong_typeflag(wrapped, flag):
    with pytest.raises(FormatError, match=r"^blob: typeflag"):
        detect_bytes(patch(wrapped, 1024 + 156, flag, header_at=1024))


def test_bad_entry_checksum_after_pax(wrapped):
    with pytest.raises(FormatError, match=r"^blob: chksum"):
        detect_bytes(patch(wrapped, 1024, b"X"))


def test_layouts_overlaybd_would_misread(wrapped):
    # PAX header with no data block: payload would be at 1024, overlaybd says 1536.
    blob = patch(wrapped, 124, b"          0 ", header_at=0)
    blob = blob[:512] + blob[1024:]
    with pytest.raises(FormatError, match=r"^blob: payload offset"):
        detect_bytes(blob)
    # GNU long name before the entry: overlaybd says 512, the entry data is at 1536.
    entry = wrapped[1024:]
    longname = patch(patch(entry[:512], 156, b"L"), 124, b"         20 ", header_at=0)
    blob = longname + b"n" * 16 + bytes(496) + entry
    with pytest.raises(FormatError, match=r"^blob: payload offset"):
        detect_bytes(blob)


def test_truncated_after_extension_header(wrapped):
    with pytest.raises(FormatError, match=r"^blob: (size|typeflag)"):
        detect_bytes(wrapped[:1100])
    with pytest.raises(FormatError, match=r"^blob: typeflag"):
        detect_bytes(wrapped[:1024] + bytes(2048))


@settings(max_examples=300)
@given(data=st.data())
def test_mutations_only_raise_format_error(data):
    blob = bytearray(python_tar(tarfile.PAX_FORMAT, b"q" * 40, name="n" * 120))
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, 1535))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        found = detect_bytes(bytes(blob[:cut]))
    except FormatError:
        return
    if found is not None:
        assert found[0] + found[1] <= cut
