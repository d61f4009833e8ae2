"""Tests of tcmu_obd.remote.trace: overlaybd's prefetch trace file laid out by hand
from the trace format (docs/runtime.md, Trace file format) (with a CRC32C computed here by a bitwise loop,
independently of tcmu_obd), corruption reporting, mode detection, the
recorder's .lock/.ok protocol and the prefetch file-list parser."""
import os
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_obd.remote import trace
from tcmu_obd.errors import CorruptDataError, FormatError, UsageError

MAGIC_LE = bytes([0x20, 0x18, 0xEF, 0xC2])          # 0xC2EF1820 little-endian


def raw_crc32c(data, crc=0):
    """Reflected Castagnoli polynomial, no pre/post inversion (overlaybd's raw CRC)."""
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


def le(value, n):
    return value.to_bytes(n, "little", signed=value < 0)


def record_bytes(op, layer, count, offset, pad=b"\0\0\0"):
    rec = bytes([op]) + pad + le(layer, 4) + le(count, 8) + le(offset, 8)
    assert len(rec) == 24
    return rec


def header_bytes(data_size, checksum, pad1=b"\0" * 4, pad2=b"\0" * 4):
    hdr = MAGIC_LE + pad1 + le(data_size, 8) + le(checksum, 4) + pad2
    assert len(hdr) == 24
    return hdr


def chained_crc(records):
    c = 0
    for rec in records:
        c = raw_crc32c(rec, c)
    return c


def build(records, checksum=None, data_size=None):
    body = b"".join(records)
    c = chained_crc(records) if checksum is None else checksum
    return header_bytes(len(body) if data_size is None else data_size, c) + body


REC1 = record_bytes(0x52, 1, 0x1000, 0x2000)
REC2 = record_bytes(0x52, 0, 0x10000, 0x123456789)
GOLDEN_CRC = 0xAF35883B                     # chained_crc([REC1, REC2]), pinned
GOLDEN = header_bytes(48, GOLDEN_CRC) + REC1 + REC2
GOLDEN_RECORDS = [trace.TraceRecord("R", 1, 0x1000, 0x2000),
                  trace.TraceRecord("R", 0, 0x10000, 0x123456789)]


# ------------------------------------------------------------------ golden bytes
def test_trace_format_crc_loop_matches_published_crc32c_check_value():
    # standard CRC32C ("123456789") = raw CRC from ~0, inverted
    assert raw_crc32c(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283


def test_trace_format_golden_two_records():
    assert chained_crc([REC1, REC2]) == GOLDEN_CRC
    assert GOLDEN.hex() == (
        "2018efc2" "00000000" "3000000000000000" "3b8835af" "00000000"
        "52000000" "01000000" "0010000000000000" "0020000000000000"
        "52000000" "00000000" "0000010000000000" "8967452301000000")
    assert trace.encode(GOLDEN_RECORDS) == GOLDEN
    assert trace.decode(GOLDEN, "g") == GOLDEN_RECORDS
    assert trace.checksum(REC1 + REC2) == GOLDEN_CRC


def test_trace_format_empty_trace():
    empty = MAGIC_LE + bytes(20)
    assert trace.encode([]) == empty
    assert trace.decode(empty) == []


def test_trace_format_write_op_roundtrips():
    recs = [trace.TraceRecord("W", 7, 1, 0)]
    data = trace.encode(recs)
    assert data[24] == 0x57
    assert trace.decode(data) == recs


records_st = st.lists(st.builds(trace.TraceRecord, st.sampled_from("RW"),
                                st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
                                st.integers(0, 2**63 - 1)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(records_st)
def test_trace_format_roundtrip(records):
    data = trace.encode(records)
    assert len(data) == 24 + 24 * len(records)
    magic, data_size, crc = struct.unpack_from("<I4xQI4x", data)
    assert (magic, data_size) == (0xC2EF1820, 24 * len(records))
    assert crc == chained_crc([data[24 + 24 * i:48 + 24 * i] for i in range(len(records))])
    assert trace.decode(data, "p") == records


@pytest.mark.parametrize("bad", [
    trace.TraceRecord("X", 0, 1, 0), trace.TraceRecord("R", -1, 1, 0),
    trace.TraceRecord("R", 2**32, 1, 0), trace.TraceRecord("R", 0, -1, 0),
    trace.TraceRecord("R", 0, 2**64, 0), trace.TraceRecord("R", 0, 1, -1)])
def test_trace_format_encode_rejects_unrepresentable_records(bad):
    with pytest.raises(UsageError):
        trace.encode([bad])


# ------------------------------------------------------------------ corruption
def _with_crc(records):
    return build(records)


CORRUPTIONS = [
    ("empty file", b"", "size"),
    ("short header", GOLDEN[:23], "size"),
    ("bad magic", b"\x21" + GOLDEN[1:], "magic"),
    ("big-endian magic", bytes(reversed(MAGIC_LE)) + GOLDEN[4:], "magic"),
    ("truncated record", GOLDEN[:-1], "data_size"),
    ("extra byte", GOLDEN + b"\0", "data_size"),
    ("data_size too small", header_bytes(24, GOLDEN_CRC) + REC1 + REC2, "data_size"),
    ("data_size not a multiple of 24", build([REC1, REC2 + b"\0"], data_size=49), "data_size"),
    ("checksum field altered", header_bytes(48, GOLDEN_CRC ^ 1) + REC1 + REC2, "checksum"),
    ("record byte flipped", GOLDEN[:40] + bytes([GOLDEN[40] ^ 0x80]) + GOLDEN[41:], "checksum"),
    ("bad op, valid crc", _with_crc([REC1, record_bytes(0x51, 0, 1, 0)]), "records[1].op"),
    ("zero op, valid crc", _with_crc([record_bytes(0, 0, 1, 0)]), "records[0].op"),
    ("negative offset, valid crc", _with_crc([record_bytes(0x52, 0, 1, -4096)]), "records[0].offset"),
]


@pytest.mark.parametrize("name,data,fld", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_trace_format_corruption_names_field(name, data, fld):
    with pytest.raises(FormatError) as ei:
        trace.decode(data, "/x/trace")
    e = ei.value
    assert e.field == fld
    assert e.path == "/x/trace"
    assert str(e).startswith(f"/x/trace: {fld} = ")
    if fld == "checksum":
        assert isinstance(e, CorruptDataError)


def test_trace_format_every_single_byte_flip_is_caught():
    header_padding = set(range(4, 8)) | set(range(20, 24))
    for pos in range(len(GOLDEN)):
        for bit in (0x01, 0x80):
            data = bytearray(GOLDEN)
            data[pos] ^= bit
            if pos in header_padding:
                assert trace.decode(bytes(data)) == GOLDEN_RECORDS    # not checked, like overlaybd
            else:
                with pytest.raises(FormatError):
                    trace.decode(bytes(data))


def test_trace_format_nonzero_record_padding_verifies_when_crc_covers_it(tmp_path):
    recs = [record_bytes(0x52, 3, 512, 4096, pad=b"\xaa\xbb\xcc"),
            record_bytes(0x57, 0, 8, 0, pad=b"\x01\x00\xff")]
    data = header_bytes(48, chained_crc(recs), pad1=b"\x11" * 4, pad2=b"\xee" * 4) + b"".join(recs)
    p = tmp_path / "trace"
    p.write_bytes(data)
    assert trace.read(p) == [trace.TraceRecord("R", 3, 512, 4096), trace.TraceRecord("W", 0, 8, 0)]
    # the same records with a CRC over zeroed padding do not verify
    zeroed = [record_bytes(0x52, 3, 512, 4096), record_bytes(0x57, 0, 8, 0)]
    bad = header_bytes(48, chained_crc(zeroed)) + b"".join(recs)
    with pytest.raises(CorruptDataError) as ei:
        trace.decode(bad, str(p))
    assert ei.value.field == "checksum"


# ------------------------------------------------------------------ mode detection
def test_trace_format_detect_mode_four_cases(tmp_path):
    assert trace.detect_mode(tmp_path / "missing") == "disabled"
    (tmp_path / "empty").write_bytes(b"")
    assert trace.detect_mode(tmp_path / "empty") == "record"
    (tmp_path / "trace").write_bytes(GOLDEN)
    assert trace.detect_mode(tmp_path / "trace") == "replay"
    (tmp_path / "list").write_text("/usr/bin/\n/etc/passwd\n")
    assert trace.detect_mode(tmp_path / "list") == "filelist"


def test_trace_format_detect_mode_edges(tmp_path):
    assert trace.detect_mode(tmp_path) == "disabled"                  # a directory
    (tmp_path / "short").write_bytes(MAGIC_LE + b"\0\0")              # magic, no full header
    assert trace.detect_mode(tmp_path / "short") == "replay"
    with pytest.raises(FormatError):
        trace.read(tmp_path / "short")
    (tmp_path / "three").write_bytes(MAGIC_LE[:3])
    assert trace.detect_mode(tmp_path / "three") == "filelist"


# ------------------------------------------------------------------ recorder
def test_trace_format_recorder_lock_ok_protocol(tmp_path):
    path = tmp_path / "trace"
    path.write_bytes(b"")
    rec = trace.TraceRecorder().start(path)
    lock, ok = str(path) + ".lock", str(path) + ".ok"
    assert os.path.exists(lock) and not os.path.exists(ok)
    assert rec.poll() is False

    def worker(layer):
        for i in range(200):
            rec.add(layer, i * 4096, 4096)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rec.records()) == 800
    assert path.read_bytes() == b""                 # nothing written before the stop

    os.unlink(lock)
    assert rec.poll() is True
    rec.add(0, 0, 512)                              # ignored after the stop
    assert rec.finish() == 800
    assert not os.path.exists(lock) and os.path.exists(ok)
    got = trace.read(path)
    assert len(got) == 800
    assert sorted(got) == sorted(trace.TraceRecord("R", k, 4096, i * 4096)
                                 for k in range(4) for i in range(200))
    assert path.read_bytes() == trace.encode(rec.records())
    assert trace.detect_mode(path) == "replay"
    assert rec.finish() is None                     # idempotent
    rec.close()


def test_trace_format_recorder_close_dumps_and_replaces_stale_ok(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"")
    (tmp_path / "t.ok").write_text("stale")
    rec = trace.TraceRecorder().start(str(path))
    rec.add(2, 8192, 16384)
    rec.close()                                     # device closes while .lock still exists
    assert not (tmp_path / "t.lock").exists()
    assert (tmp_path / "t.ok").read_bytes() == b""
    assert trace.read(path) == [trace.TraceRecord("R", 2, 16384, 8192)]


def test_trace_format_recorder_empty_trace_and_watcher(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"")
    rec = trace.TraceRecorder().start(path)
    watcher = rec.watch(interval=0.01)
    os.unlink(str(path) + ".lock")
    watcher.join(5)
    assert rec.finished
    assert path.read_bytes() == MAGIC_LE + bytes(20)
    assert (tmp_path / "t.ok").exists()


def test_trace_format_recorder_misuse(tmp_path):
    rec = trace.TraceRecorder()
    with pytest.raises(UsageError):
        rec.finish()
    with pytest.raises(UsageError):
        rec.add(-1, 0, 1)
    rec.start(tmp_path / "t")
    with pytest.raises(UsageError):
        rec.start(tmp_path / "u")


# ------------------------------------------------------------------ file list
def test_trace_format_file_list_parsing():
    text = ("/usr/bin/python3\n"
            "  /etc/ssl/   \r\n"
            "/opt/app/*\n"
            "\n"
            "relative/path\n"
            "# comment\n"
            "/usr/lib/libc*\n"
            "/a//b\n"
            "/a/../etc/shadow\n"
            "/./x\n"
            "/with space/f\n"
            "/lib/libstdc++.so.6\n"
            "/\n"
            "/*\n"
            "/usr/bin/python3\n"
            "\t/var/lib/x_y-z.1:2@3\t\n")
    assert trace.parse_file_list(text.encode(), "l") == [
        ("/usr/bin/python3", False), ("/etc/ssl", True), ("/opt/app", True),
        ("/lib/libstdc++.so.6", False), ("/", True), ("/", True),
        ("/usr/bin/python3", False), ("/var/lib/x_y-z.1:2@3", False)]


def test_trace_format_file_list_non_utf8_and_str_input():
    assert trace.parse_file_list(b"/ok\n/bad\xff\n/fine/\n") == [("/ok", False), ("/fine", True)]
    assert trace.parse_file_list("/x/y\n") == [("/x/y", False)]


def test_trace_format_file_list_size_limit():
    line = b"/" + b"a" * 1022 + b"\n"
    assert len(trace.parse_file_list(line * 64)) == 64             # exactly 64 KiB
    with pytest.raises(FormatError) as ei:
        trace.parse_file_list(line * 64 + b"\n", "/t/list")
    assert ei.value.field == "size" and ei.value.value == 65537
    assert str(ei.value).startswith("/t/list: size = 65537")
