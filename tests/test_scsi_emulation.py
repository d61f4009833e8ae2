"""The TCMU handler's SCSI emulation (tcmu_obd.scsi), byte for byte against
layouts written out by hand from SPC-4 / SBC-3.  Pure functions: no kernel,
no libtcmu."""
import struct

import pytest

from tcmu_obd import scsi
from tcmu_obd.handler import Backend, parse_cfgstring

GiB = 1 << 30
SERIAL = "0123abcd-4567-89ef-0123-456789abcdef"


def ro():
    return scsi.DeviceInfo(64 * GiB // 512, 512, writable=False, serial=SERIAL)


def rw():
    return scsi.DeviceInfo(64 * GiB // 512, 512, writable=True, serial=SERIAL)


def cdb(*b):
    return bytes(b)


def test_standard_inquiry():
    st, data = scsi.emulate(cdb(0x12, 0, 0, 0, 0xFF, 0), ro())
    assert st == scsi.OK
    want = (bytes([0x00, 0x00, 0x05, 0x02, 31, 0x00, 0x00, 0x02]) + b"LIO-ORG " +
            b"TCMU device     " + b"0002")
    assert data == want
    # the allocation length cuts the data
    assert scsi.emulate(cdb(0x12, 0, 0, 0, 5, 0), ro())[1] == want[:5]
    # a page code without EVPD is an invalid field
    assert scsi.emulate(cdb(0x12, 0, 0x80, 0, 0xFF, 0), ro())[0] == scsi.INVALID_CDB


def test_vpd_supported_pages_and_serial():
    st, data = scsi.emulate(cdb(0x12, 1, 0x00, 0, 0xFF, 0), ro())
    assert data == bytes([0, 0x00, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    st, data = scsi.emulate(cdb(0x12, 1, 0x80, 0, 0xFF, 0), ro())
    assert data == bytes([0, 0x80, 0, len(SERIAL)]) + SERIAL.encode()
    assert scsi.emulate(cdb(0x12, 1, 0x87, 0, 0xFF, 0), ro())[0] == scsi.INVALID_CDB


def test_vpd_device_identification():
    st, data = scsi.emulate(cdb(0x12, 1, 0x83, 0, 0xFF, 0), ro())
    # NAA 6: 6h | OUI 001405h | 25 hex digits of the serial (dashes dropped)
    naa = bytes.fromhex("6001405" + "0123abcd456789ef012345678")
    t10 = b"LIO-ORG " + SERIAL.encode()
    body = bytes([0x01, 0x03, 0x00, 16]) + naa + bytes([0x02, 0x01, 0x00, len(t10)]) + t10
    assert data == bytes([0, 0x83]) + struct.pack(">H", len(body)) + body


def test_vpd_block_limits():
    st, data = scsi.emulate(cdb(0x12, 1, 0xB0, 0, 0xFF, 0), rw())
    assert st == scsi.OK and len(data) == 64
    assert data[:4] == bytes([0, 0xB0, 0, 0x3C])
    assert data[4] & 1                                            # WSNZ
    assert data[8:12] == bytes([0, 0, 0x08, 0x00])                # max transfer 2048 blocks = 1 MiB
    assert data[20:24] == struct.pack(">I", scsi.MAX_UNMAP_BLOCKS)
    assert data[24:28] == struct.pack(">I", scsi.MAX_UNMAP_DESCRIPTORS)
    assert data[36:44] == struct.pack(">Q", scsi.MAX_UNMAP_BLOCKS)
    # read-only: no unmap limits
    data = scsi.emulate(cdb(0x12, 1, 0xB0, 0, 0xFF, 0), ro())[1]
    assert data[8:12] == bytes([0, 0, 0x08, 0x00]) and data[20:28] == bytes(8)


def test_vpd_characteristics_and_provisioning():
    data = scsi.emulate(cdb(0x12, 1, 0xB1, 0, 0xFF, 0), ro())[1]
    assert data[:6] == bytes([0, 0xB1, 0, 0x3C, 0x00, 0x01]) and len(data) == 64   # non-rotating
    data = scsi.emulate(cdb(0x12, 1, 0xB2, 0, 0xFF, 0), rw())[1]
    assert data == bytes([0, 0xB2, 0, 4, 0, 0b11100100, 0x02, 0])   # LBPU LBPWS LBPWS10 LBPRZ, thin
    data = scsi.emulate(cdb(0x12, 1, 0xB2, 0, 0xFF, 0), ro())[1]
    assert data == bytes([0, 0xB2, 0, 4, 0, 0, 0, 0])


def test_read_capacity():
    st, data = scsi.emulate(cdb(0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0), ro())
    assert data == bytes.fromhex("07ffffff") + bytes.fromhex("00000200")
    big = scsi.DeviceInfo(1 << 33, 512)
    assert scsi.emulate(cdb(0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0), big)[1][:4] == b"\xff\xff\xff\xff"
    c16 = cdb(0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0)
    st, data = scsi.emulate(c16, rw())
    assert data == (bytes.fromhex("0000000007ffffff") + bytes.fromhex("00000200") +
                    bytes([0, 0, 0xC0, 0]) + bytes(16))      # LBPME | LBPRZ
    assert scsi.emulate(c16, ro())[1][14] == 0
    assert len(scsi.emulate(c16[:13] + b"\x0c\x00\x00", ro())[1]) == 12   # allocation length
    assert scsi.emulate(cdb(0x9E, 0x11, *bytes(14)), ro())[0] == scsi.INVALID_CMD


def test_mode_sense_6_all_pages():
    st, data = scsi.emulate(cdb(0x1A, 0, 0x3F, 0, 0xFF, 0), ro())
    blockdesc = bytes.fromhex("08000000") + bytes([0, 0, 0x02, 0x00])   # number of blocks, length
    rwerr = bytes([0x01, 0x0A]) + bytes(10)
    caching = bytes([0x08, 0x12, 0x04]) + bytes(17)
    control = bytes([0x0A, 0x0A, 0x00, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])
    body = bytes([0x00, 0x80, 8]) + blockdesc + rwerr + caching + control   # WP set
    assert data == bytes([len(body)]) + body
    # writable: WP clear; DBD drops the block descriptor
    st, data = scsi.emulate(cdb(0x1A, 0x08, 0x08, 0, 0xFF, 0), rw())
    assert data == bytes([3 + 20, 0x00, 0x00, 0]) + caching


def test_mode_sense_10_long_lba_and_errors():
    st, data = scsi.emulate(cdb(0x5A, 0x10, 0x0A, 0, 0, 0, 0, 0, 0xFF, 0), rw())
    long_desc = struct.pack(">Q", 64 * GiB // 512) + bytes(4) + struct.pack(">I", 512)
    control = bytes([0x0A, 0x0A, 0x00, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])
    body = bytes([0, 0x00, 0x01, 0]) + struct.pack(">H", 16) + long_desc + control
    assert data == struct.pack(">H", len(body)) + body
    # changeable values: all zero
    data = scsi.emulate(cdb(0x5A, 0x08, 0x48, 0, 0, 0, 0, 0, 0xFF, 0), rw())[1]
    assert data[8:] == bytes([0x08, 0x12]) + bytes(18)
    assert scsi.emulate(cdb(0x1A, 0, 0xC8, 0, 0xFF, 0), rw())[0] == scsi.NOTSUPP_SAVE_PARAMS
    assert scsi.emulate(cdb(0x1A, 0, 0x1C, 0, 0xFF, 0), rw())[0] == scsi.INVALID_CDB
    assert scsi.emulate(cdb(0x1A, 0, 0x08, 0x01, 0xFF, 0), rw())[0] == scsi.INVALID_CDB


def test_mode_select_accepts_only_current_values():
    info = rw()
    caching = scsi.mode_page(0x08, info)
    same = bytes([0, 0, 0, 0]) + caching
    assert scsi.emulate(cdb(0x15, 0x10, 0, 0, len(same), 0), info, same)[0] == scsi.OK
    changed = bytes([0, 0, 0, 0]) + caching[:2] + bytes([0]) + caching[3:]   # WCE off
    assert scsi.emulate(cdb(0x15, 0x10, 0, 0, len(changed), 0), info, changed)[0] == \
        scsi.INVALID_PARAM_LIST
    assert scsi.emulate(cdb(0x15, 0x11, 0, 0, len(same), 0), info, same)[0] == scsi.NOTSUPP_SAVE_PARAMS
    ten = bytes(8) + caching
    assert scsi.emulate(cdb(0x55, 0x10, 0, 0, 0, 0, 0, 0, len(ten), 0), info, ten)[0] == scsi.OK


def test_unsupported_and_trivial_commands():
    assert scsi.emulate(cdb(0x00, 0, 0, 0, 0, 0), ro()) == (scsi.OK, b"")
    assert scsi.emulate(cdb(0x1B, 0, 0, 0, 1, 0), ro()) == (scsi.OK, b"")
    for op in (0x2F, 0x1D, 0xA3, 0x04, 0x89):
        assert scsi.emulate(cdb(op, *bytes(15)), ro())[0] == scsi.INVALID_CMD
    st, data = scsi.emulate(cdb(0x03, 0, 0, 0, 18, 0), ro())
    assert data == bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10)


def test_rw_cdb_decoding():
    assert scsi.rw_args(cdb(0x08, 0x1F, 0xFF, 0xFF, 0, 0)) == (0x1FFFFF, 256)
    assert scsi.rw_args(cdb(0x28, 0, 0, 0, 1, 0, 0, 0, 8, 0)) == (256, 8)
    assert scsi.rw_args(cdb(0xA8, 0, 0, 0, 0, 9, 0, 1, 0, 0, 0, 0)) == (9, 65536)
    assert scsi.rw_args(cdb(0x8A, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0)) == (1 << 32, 2)
    assert scsi.classify(cdb(0x88)) == scsi.KIND_READ
    assert scsi.classify(cdb(0x2A)) == scsi.KIND_WRITE
    assert scsi.classify(cdb(0x91)) == scsi.KIND_SYNC
    assert scsi.classify(cdb(0x42)) == scsi.KIND_UNMAP
    assert scsi.classify(cdb(0x41)) == scsi.KIND_WRITE_SAME
    assert scsi.write_same_args(cdb(0x93, 0x08, *bytes(8), 0, 0, 0x10, 0, 0, 0)) == (0, 4096, True)


def test_unmap_parameter_list():
    info = rw()
    plist = struct.pack(">HH4x", 6 + 32, 32) + struct.pack(">QI4x", 100, 8) + struct.pack(">QI4x", 4096, 0)
    c = cdb(0x42, 0, 0, 0, 0, 0, 0, 0, len(plist), 0)
    assert scsi.parse_unmap(c, plist, info) == (scsi.OK, [(100, 8)])
    bad = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", info.num_lbas - 4, 8)
    assert scsi.parse_unmap(c, bad, info)[0] == scsi.RANGE
    assert scsi.parse_unmap(cdb(0x42, *bytes(9)), b"", info) == (scsi.OK, [])
    assert scsi.parse_unmap(c, b"\x00" * 4, info)[0] == scsi.INVALID_PARAM_LIST_LEN


class FakeImage:
    writable = True
    stack = None

    def __init__(self):
        self.ops = []

    def write(self, data, offset):
        self.ops.append(("write", offset, bytes(data)))

    def discard(self, offset, length):
        self.ops.append(("discard", offset, length))

    def fsync(self):
        self.ops.append(("fsync",))


def test_backend_slow_paths():
    img = FakeImage()
    b = Backend(img, rw())
    assert b.slow(scsi.KIND_SYNC, cdb(0x35, *bytes(9)), b"") == scsi.OK
    ws_unmap = cdb(0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0)
    assert b.slow(scsi.KIND_WRITE_SAME, ws_unmap, bytes(512)) == scsi.OK
    ws_zero = cdb(0x41, 0, 0, 0, 0, 32, 0, 0, 4, 0)
    assert b.slow(scsi.KIND_WRITE_SAME, ws_zero, bytes(512)) == scsi.OK
    ws_pat = cdb(0x41, 0, 0, 0, 0, 64, 0, 0, 3, 0)
    assert b.slow(scsi.KIND_WRITE_SAME, ws_pat, b"\x5a" * 512) == scsi.OK
    assert b.slow(scsi.KIND_WRITE_SAME, cdb(0x41, 0, 0, 0, 0, 64, 0, 0, 0, 0), b"\x5a" * 512) == \
        scsi.INVALID_CDB                                     # WSNZ
    assert img.ops == [("fsync",), ("discard", 8 * 512, 16 * 512),
                       ("discard", 32 * 512, 4 * 512), ("write", 64 * 512, b"\x5a" * 1536)]


@pytest.mark.parametrize("text, want", [
    ("overlaybd//abs/config.v1.json", ("/abs/config.v1.json", "")),
    ("overlaybd//abs/config.v1.json;128", ("/abs/config.v1.json", "128")),
    ("overlaybd/rel.json", ("rel.json", "")),
])
def test_cfgstring(text, want):
    assert parse_cfgstring(text) == want


@pytest.mark.parametrize("text", ["qcow//x", "overlaybdx//x", "overlaybd", "overlaybd/"])
def test_cfgstring_rejected(text):
    with pytest.raises(ValueError):
        parse_cfgstring(text)
