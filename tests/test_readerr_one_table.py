"""The read-error codes live once, in tcmu_obd.core.readerr: the Cython core's
`cdef enum` mirror (exported as _lsmt.READ_ERROR_CODES) and the pure-Python
twin's codes must equal it, and readerr.exception() must turn each code into
an error that names the file (and, for corrupt data, the field and value).
A real read of a truncated and of a corrupted file through both cores checks
that both raise through that one table.
"""
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_obd.core import _lsmt as C
from tcmu_obd.core import readerr
from tcmu_obd.core import reference as R
from tcmu_obd.core.reference import _common as R_common
from tcmu_obd.errors import CorruptDataError, ReadError, UsageError


def test_readerr_cython_enum_equals_the_table():
    assert C.READ_ERROR_CODES == readerr.CODES
    assert sorted(readerr.CODES.values()) == list(range(1, len(readerr.CODES) + 1))


def test_readerr_twin_codes_equal_the_table():
    for name in ("E_IO", "E_SHORT", "E_CRC", "E_DECODE", "E_RANGE", "E_TAG", "E_MISS"):   # no NOMEM, MAPFAULT
        assert getattr(R_common, name) == readerr.CODES[name], name


@given(code=st.sampled_from(sorted(readerr.CODES.values())),
       a=st.integers(0, (1 << 64) - 1), b=st.integers(0, (1 << 64) - 1), c=st.integers(0, (1 << 32) - 1))
def test_readerr_every_code_names_the_file(code, a, b, c):
    e = readerr.exception(code, "/layers/l0.zfile", 5, a, b, c)
    assert isinstance(e, (ReadError, CorruptDataError, UsageError, MemoryError))
    if code == readerr.E_TAG:           # a bad lower record: no file to name, the sector and tag instead
        assert str(a) in str(e) and str(b) in str(e)
    else:
        assert "/layers/l0.zfile" in str(e)
    if isinstance(e, CorruptDataError):
        assert e.path == "/layers/l0.zfile" and e.field and e.value is not None


def test_readerr_decode_value_is_the_signed_codec_result():
    e = readerr.exception(readerr.E_DECODE, "z", 0, 7, (1 << 64) - 20, 4096)
    assert (e.field, e.value) == ("zfile block 7", -20)


def test_readerr_unknown_code_is_a_read_error_with_the_code():
    e = readerr.exception(99, "f", 0, 0, 0, 0)
    assert isinstance(e, ReadError) and "code 99" in str(e)


@pytest.mark.parametrize("M", [C, R], ids=["cython", "python"])
def test_readerr_short_file_message_from_both_cores(tmp_path, M):
    p = tmp_path / "short"
    p.write_bytes(b"x" * 1000)
    fd = os.open(p, os.O_RDONLY)
    try:
        b = M.RawBacking(fd, 0, 4096, str(p))
        with pytest.raises(ReadError) as ei:
            b.pread(0, 4096)
    finally:
        os.close(fd)
    assert str(ei.value) == str(readerr.exception(readerr.E_SHORT, str(p), 0, 0, 4096, 1000))


@pytest.mark.parametrize("M", [C, R], ids=["cython", "python"])
def test_readerr_crc_message_from_both_cores(tmp_path, M):
    data = os.urandom(512) * 8
    stored, lengths = M.compress_blocks(1, data, 4096, True)
    bad = bytearray(stored)
    bad[0] ^= 0xFF                                     # the block no longer matches its CRC
    p = tmp_path / "z"
    p.write_bytes(bytes(bad))
    fd = os.open(p, os.O_RDONLY)
    try:
        z = M.ZFileBacking(fd, 0, 0, len(bad), struct.pack(f"<{len(lengths)}I", *lengths), 4096, 1, True,
                           len(data), str(p))
        with pytest.raises(CorruptDataError) as ei:
            z.pread(0, 4096)
    finally:
        os.close(fd)
    assert (ei.value.path, ei.value.field) == (str(p), "zfile block 0 crc")
    stored_crc = struct.unpack("<I", bytes(bad[len(bad) - 4:]))[0]
    assert ei.value.value == stored_crc
