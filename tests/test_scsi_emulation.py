"""The TCMU data path's SCSI handling on the host, without a kernel: every
CDB goes through _tcmu.run_cdb, i.e. Device.dispatch (the C opcode table and
CDB checks the ring's owner thread runs) and, when queued, Device.work (a
worker's run), against handler.Backend over a real image (a committed ZFile
layer, plus an RW upper for the writable cases).  Emulated data is checked
byte for byte against layouts written out by hand from SPC-4 / SBC-3; reads
and writes against the image itself."""
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_layer
from tcmu_obd.serve import scsi
from tcmu_obd.errors import UsageError
from tcmu_obd.serve.handler import Backend, parse_cfgstring
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer

_tcmu = pytest.importorskip("tcmu_obd.serve._tcmu", reason="built only where libtcmu.so.2 is installed")

GiB = 1 << 30
VSIZE = 64 * GiB
SERIAL = "0123abcd-4567-89ef-0123-456789abcdef"
LOWER = [(0, os.urandom(64 << 10)), (VSIZE - (1 << 20), b"\xa5" * (1 << 20))]
PASSTHROUGH = 2             # TCMU_STS_PASSTHROUGH_ERR: the sense buffer holds the error


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(read-only image, writable image) over the same lower layer."""
    tmp = str(tmp_path_factory.mktemp("scsi"))
    lower = make_layer(tmp, "lower", LOWER, vsize=VSIZE, use_zfile=True)
    ro_img = Image([open_layer(lower)])
    up = RWLayer.create(os.path.join(tmp, "up.data"), os.path.join(tmp, "up.index"), VSIZE)
    rw_img = Image([open_layer(lower)], up)
    yield ro_img, rw_img
    ro_img.close()
    rw_img.close()


@pytest.fixture(scope="module")
def ro(images):
    return images[0]


@pytest.fixture(scope="module")
def rw(images):
    return images[1]


def run(image, cdb, data=b"", data_in=4096, iovecs=1, num_lbas=None):
    """(status, data-in, sense) of one command on a device serving `image`."""
    num_lbas = num_lbas or image.virtual_size // 512
    info = scsi.DeviceInfo(num_lbas, 512, image.writable, SERIAL)
    return _tcmu.run_cdb(Backend(image, info), num_lbas, image.writable, bytes(cdb), data,
                         data_in, iovecs)


def emu(image, cdb, data=b"", **kw):
    st, data, _ = run(image, cdb, data, **kw)
    return st, data


def cdb(*b):
    return bytes(b)


def test_scsi_emulation_standard_inquiry(ro):
    st, data = emu(ro, cdb(0x12, 0, 0, 0, 0xFF, 0))
    assert st == scsi.OK
    want = (bytes([0x00, 0x00, 0x05, 0x02, 31, 0x00, 0x00, 0x02]) + b"LIO-ORG " +
            b"TCMU device     " + b"0002")
    assert data == want
    # the allocation length cuts the data, and so does the buffer
    assert emu(ro, cdb(0x12, 0, 0, 0, 5, 0))[1] == want[:5]
    assert emu(ro, cdb(0x12, 0, 0, 0, 0xFF, 0), data_in=7)[1] == want[:7]
    assert emu(ro, cdb(0x12, 0, 0, 0, 0xFF, 0), data_in=36, iovecs=5)[1] == want
    # a page code without EVPD is an invalid field
    assert emu(ro, cdb(0x12, 0, 0x80, 0, 0xFF, 0))[0] == scsi.INVALID_CDB


def test_scsi_emulation_vpd_supported_pages_and_serial(ro):
    st, data = emu(ro, cdb(0x12, 1, 0x00, 0, 0xFF, 0))
    assert data == bytes([0, 0x00, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    st, data = emu(ro, cdb(0x12, 1, 0x80, 0, 0xFF, 0))
    assert data == bytes([0, 0x80, 0, len(SERIAL)]) + SERIAL.encode()
    assert emu(ro, cdb(0x12, 1, 0x87, 0, 0xFF, 0))[0] == scsi.INVALID_CDB


def test_scsi_emulation_vpd_device_identification(ro):
    st, data = emu(ro, cdb(0x12, 1, 0x83, 0, 0xFF, 0))
    # NAA 6: 6h | OUI 001405h | 25 hex digits of the serial (dashes dropped)
    naa = bytes.fromhex("6001405" + "0123abcd456789ef012345678")
    t10 = b"LIO-ORG " + SERIAL.encode()
    body = bytes([0x01, 0x03, 0x00, 16]) + naa + bytes([0x02, 0x01, 0x00, len(t10)]) + t10
    assert data == bytes([0, 0x83]) + struct.pack(">H", len(body)) + body


def test_scsi_emulation_vpd_block_limits(ro, rw):
    st, data = emu(rw, cdb(0x12, 1, 0xB0, 0, 0xFF, 0))
    assert st == scsi.OK and len(data) == 64
    assert data[:4] == bytes([0, 0xB0, 0, 0x3C])
    assert data[4] & 1                                            # WSNZ
    assert data[8:12] == bytes([0, 0, 0x08, 0x00])                # max transfer 2048 blocks = 1 MiB
    assert data[20:24] == struct.pack(">I", scsi.MAX_UNMAP_BLOCKS)
    assert data[24:28] == struct.pack(">I", scsi.MAX_UNMAP_DESCRIPTORS)
    assert data[36:44] == struct.pack(">Q", scsi.MAX_UNMAP_BLOCKS)
    # read-only: no unmap limits
    data = emu(ro, cdb(0x12, 1, 0xB0, 0, 0xFF, 0))[1]
    assert data[8:12] == bytes([0, 0, 0x08, 0x00]) and data[20:28] == bytes(8)


def test_scsi_emulation_vpd_characteristics_and_provisioning(ro, rw):
    data = emu(ro, cdb(0x12, 1, 0xB1, 0, 0xFF, 0))[1]
    assert data[:6] == bytes([0, 0xB1, 0, 0x3C, 0x00, 0x01]) and len(data) == 64   # non-rotating
    data = emu(rw, cdb(0x12, 1, 0xB2, 0, 0xFF, 0))[1]
    assert data == bytes([0, 0xB2, 0, 4, 0, 0b11100100, 0x02, 0])   # LBPU LBPWS LBPWS10 LBPRZ, thin
    data = emu(ro, cdb(0x12, 1, 0xB2, 0, 0xFF, 0))[1]
    assert data == bytes([0, 0xB2, 0, 4, 0, 0, 0, 0])


def test_scsi_emulation_read_capacity(ro, rw):
    st, data = emu(ro, cdb(0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert data == bytes.fromhex("07ffffff") + bytes.fromhex("00000200")
    assert emu(ro, cdb(0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0), num_lbas=1 << 33)[1][:4] == b"\xff\xff\xff\xff"
    c16 = cdb(0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0)
    st, data = emu(rw, c16)
    assert data == (bytes.fromhex("0000000007ffffff") + bytes.fromhex("00000200") +
                    bytes([0, 0, 0xC0, 0]) + bytes(16))      # LBPME | LBPRZ
    assert emu(ro, c16)[1][14] == 0
    assert len(emu(ro, c16[:13] + b"\x0c\x00\x00")[1]) == 12   # allocation length
    # another service action of SERVICE ACTION IN (16) is not supported
    assert emu(ro, cdb(0x9E, 0x11, *bytes(14)))[0] == scsi.INVALID_CMD


def test_scsi_emulation_mode_sense_6_all_pages(ro, rw):
    st, data = emu(ro, cdb(0x1A, 0, 0x3F, 0, 0xFF, 0))
    blockdesc = bytes.fromhex("08000000") + bytes([0, 0, 0x02, 0x00])   # number of blocks, length
    rwerr = bytes([0x01, 0x0A]) + bytes(10)
    caching = bytes([0x08, 0x12, 0x04]) + bytes(17)
    control = bytes([0x0A, 0x0A, 0x00, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])
    body = bytes([0x00, 0x80, 8]) + blockdesc + rwerr + caching + control   # WP set
    assert data == bytes([len(body)]) + body
    # writable: WP clear; DBD drops the block descriptor
    st, data = emu(rw, cdb(0x1A, 0x08, 0x08, 0, 0xFF, 0))
    assert data == bytes([3 + 20, 0x00, 0x00, 0]) + caching


def test_scsi_emulation_mode_sense_10_long_lba_and_errors(rw):
    st, data = emu(rw, cdb(0x5A, 0x10, 0x0A, 0, 0, 0, 0, 0, 0xFF, 0))
    long_desc = struct.pack(">Q", VSIZE // 512) + bytes(4) + struct.pack(">I", 512)
    control = bytes([0x0A, 0x0A, 0x00, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])
    body = bytes([0, 0x00, 0x01, 0]) + struct.pack(">H", 16) + long_desc + control
    assert data == struct.pack(">H", len(body)) + body
    # changeable values: all zero
    data = emu(rw, cdb(0x5A, 0x08, 0x48, 0, 0, 0, 0, 0, 0xFF, 0))[1]
    assert data[8:] == bytes([0x08, 0x12]) + bytes(18)
    assert emu(rw, cdb(0x1A, 0, 0xC8, 0, 0xFF, 0))[0] == scsi.NOTSUPP_SAVE_PARAMS
    assert emu(rw, cdb(0x1A, 0, 0x1C, 0, 0xFF, 0))[0] == scsi.INVALID_CDB
    assert emu(rw, cdb(0x1A, 0, 0x08, 0x01, 0xFF, 0))[0] == scsi.INVALID_CDB


def test_scsi_emulation_mode_select_accepts_only_current_values(rw):
    info = scsi.DeviceInfo(VSIZE // 512, 512, True, SERIAL)
    caching = scsi.mode_page(0x08, info)
    same = bytes([0, 0, 0, 0]) + caching
    assert emu(rw, cdb(0x15, 0x10, 0, 0, len(same), 0), same)[0] == scsi.OK
    changed = bytes([0, 0, 0, 0]) + caching[:2] + bytes([0]) + caching[3:]   # WCE off
    assert emu(rw, cdb(0x15, 0x10, 0, 0, len(changed), 0), changed)[0] == scsi.INVALID_PARAM_LIST
    assert emu(rw, cdb(0x15, 0x11, 0, 0, len(same), 0), same)[0] == scsi.NOTSUPP_SAVE_PARAMS
    ten = bytes(8) + caching
    assert emu(rw, cdb(0x55, 0x10, 0, 0, 0, 0, 0, 0, len(ten), 0), ten)[0] == scsi.OK
    assert emu(rw, cdb(0x15, 0x10, 0, 0, 0, 0))[0] == scsi.OK                     # an empty list
    # bad input: the CDB promises more parameter bytes than the buffer holds
    assert emu(rw, cdb(0x15, 0x10, 0, 0, len(same) + 1, 0), same)[0] == scsi.INVALID_PARAM_LIST_LEN
    assert emu(rw, cdb(0x15, 0x10, 0, 0, 3, 0), same[:3])[0] == scsi.INVALID_PARAM_LIST_LEN


def test_scsi_emulation_unsupported_and_trivial_commands(ro):
    assert emu(ro, cdb(0x00, 0, 0, 0, 0, 0)) == (scsi.OK, b"")
    assert emu(ro, cdb(0x1B, 0, 0, 0, 1, 0)) == (scsi.OK, b"")
    st, data = emu(ro, cdb(0x03, 0, 0, 0, 18, 0))
    assert data == bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10)


def test_scsi_emulation_every_opcode_outside_the_table_is_invalid(ro, rw):
    """All 256 opcodes: the table's are answered, every other one is
    INVALID COMMAND OPERATION CODE (from C, without calling the backend)."""
    table = {op for op, sa, kind, name in _tcmu.opcode_table()}
    for op in range(256):
        c = cdb(op, *bytes(15))
        for img in (ro, rw):
            st = run(img, c)[0]
            if op in table:
                assert st != scsi.INVALID_CMD or op == 0x9E, hex(op)     # 0x9E: only SA 0x10
            else:
                assert st == scsi.INVALID_CMD, hex(op)


def test_scsi_emulation_counts_rejections_apart_from_errors(ro, tmp_path):
    """The per-device counters: answers the initiator expects (the kernel's
    REPORT SUPPORTED OPERATION CODES probe on every attach, an opcode nobody
    implements, a read past the end, a write to a read-only device) count as
    `rejected`; a read the device fails (its layer file cut short under it)
    counts as `errors`."""
    n = ro.virtual_size // 512

    def counted(image, c, data=b"", data_in=4096):
        counts = {}
        info = scsi.DeviceInfo(image.virtual_size // 512, 512, image.writable, SERIAL)
        st = _tcmu.run_cdb(Backend(image, info), image.virtual_size // 512, image.writable,
                           bytes(c), data, data_in, 1, counts)[0]
        return st, counts

    probe = cdb(0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0)      # REPORT SUPPORTED OPCODES
    assert counted(ro, probe) == (scsi.INVALID_CMD, {"errors": 0, "rejected": 1})
    assert counted(ro, cdb(0x2F, 0, 0, 0, 0, 0, 0, 0, 1, 0))[1] == {"errors": 0, "rejected": 1}
    past = cdb(0x88, 0, *struct.pack(">Q", n), 0, 0, 0, 1, 0, 0)
    assert counted(ro, past) == (scsi.RANGE, {"errors": 0, "rejected": 1})
    st, counts = counted(ro, cdb(0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0), data=bytes(512))
    assert st == PASSTHROUGH and counts == {"errors": 0, "rejected": 1}
    assert counted(ro, cdb(0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0)) == (scsi.OK, {"errors": 0, "rejected": 0})
    path = make_layer(str(tmp_path), "cut", [(0, os.urandom(1 << 20))], vsize=1 << 30)
    img = Image([open_layer(path)])
    try:
        os.truncate(path, 8192)
        st, counts = counted(img, cdb(0x28, 0, 0, 0, 0x04, 0, 0, 0, 8, 0))
        assert st == scsi.RD_ERR and counts == {"errors": 1, "rejected": 0}
    finally:
        img.close()


def test_scsi_emulation_write_cache_off_makes_each_write_durable(rw):
    """WCE=0 (overlaybd's answer, the daemon's default): no SYNCHRONIZE CACHE
    will come, so every acknowledged write has been fsync'ed; WCE=1 leaves
    it to the initiator's flush."""
    calls = []

    class Counting:                      # the real image, its fsync counted
        def __init__(self, image):
            self.image = image
            self.stack, self.writable = image.stack, image.writable

        def write(self, buf, offset):
            return self.image.write(buf, offset)

        def fsync(self):
            calls.append(1)
            self.image.fsync()

    n = rw.virtual_size // 512
    for wce, want in ((False, 1), (True, 0)):
        calls.clear()
        info = scsi.DeviceInfo(n, 512, True, SERIAL, write_cache=wce)
        st = _tcmu.run_cdb(Backend(Counting(rw), info), n, True,
                           cdb(0x2A, 0, 0, 0, 0x10, 0, 0, 0, 1, 0), os.urandom(512))[0]
        assert st == scsi.OK and len(calls) == want, (wce, calls)
    from tcmu_obd.service_config import ServiceConfig
    assert ServiceConfig().tcmu_obd.write_cache is False       # overlaybd: write cache off


def test_scsi_emulation_table_names_all_have_a_handler(rw):
    """Each emulated command in the C table has its data builder in scsi.py,
    and an unknown name is a clear error, not a silent default."""
    for op, sa, kind, name in _tcmu.opcode_table():
        if kind == "emulate":
            assert name in scsi.EMULATIONS, name
    with pytest.raises(UsageError, match="no command named 'format_unit'"):
        scsi.emulate("format_unit", cdb(0x04, *bytes(5)), scsi.DeviceInfo(8))


def rw_cdb(op, lba, blocks):
    """A READ/WRITE CDB of `op`'s size; blocks=256 in READ(6) is written as 0."""
    if op in (0x08, 0x0A):
        return cdb(op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0)
    if op in (0x28, 0x2A):
        return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)
    if op in (0xA8, 0xAA):
        return struct.pack(">BBIIBB", op, 0, lba, blocks, 0, 0)
    return struct.pack(">BBQIBB", op, 0, lba, blocks, 0, 0)


READS = {0x08: (1 << 21, 256), 0x28: (1 << 32, 1 << 16), 0xA8: (1 << 32, 1 << 32), 0x88: (1 << 64, 1 << 32)}


@settings(max_examples=150, deadline=None)
@given(op=st.sampled_from(sorted(READS)), data=st.data(), iovecs=st.integers(1, 4))
def test_scsi_emulation_reads_decode_every_cdb_form(images, op, data, iovecs):
    """READ 6/10/12/16 through the C parser read what the image holds; a
    range past the end is LBA OUT OF RANGE, never a short or wrapped read."""
    ro_img = images[0]
    lbas = VSIZE // 512
    lba_max, blocks_max = READS[op]
    near = st.sampled_from([0, 1, 100, lbas - 2048, lbas - 1, lbas])
    lba = data.draw(st.one_of(near, st.integers(0, min(lba_max, 1 << 40) - 1)) if op != 0x08
                    else st.integers(0, lba_max - 1))
    blocks = data.draw(st.integers(1, min(blocks_max, 64)) if op != 0x08 else st.integers(1, 64))
    if op == 0x88 and data.draw(st.booleans()):
        lba = (1 << 64) - data.draw(st.integers(1, 8))          # would wrap past 2^64
    status, got, _ = run(ro_img, rw_cdb(op, lba, blocks), data_in=blocks * 512, iovecs=iovecs)
    if lba + blocks > lbas:
        assert status == scsi.RANGE
    else:
        assert status == scsi.OK
        assert got == ro_img.read(lba * 512, blocks * 512)


def test_scsi_emulation_read_6_zero_means_256_blocks(ro):
    st, got, _ = run(ro, rw_cdb(0x08, 0, 0), data_in=256 * 512)
    assert st == scsi.OK and got == ro.read(0, 256 * 512)
    # a buffer smaller than the CDB's transfer: invalid, not a short read
    assert run(ro, rw_cdb(0x28, 0, 8), data_in=7 * 512)[0] == scsi.INVALID_CDB


@pytest.mark.parametrize("op", [0x0A, 0x2A, 0xAA, 0x8A])
def test_scsi_emulation_writes_land_in_the_upper(ro, rw, op):
    lba = 1000 + op
    payload = os.urandom(3 * 512)
    assert run(rw, rw_cdb(op, lba, 3), payload, iovecs=2)[0] == scsi.OK
    assert rw.read(lba * 512, 3 * 512) == payload
    # read back through the data path
    assert run(rw, rw_cdb(op - 2, lba, 3), data_in=3 * 512)[1] == payload
    # read-only: DATA PROTECT / WRITE PROTECTED, nothing written
    st, _, sense = run(ro, rw_cdb(op, lba, 3), payload)
    assert st == PASSTHROUGH and sense[2] & 0x0F == 0x07 and sense[12:14] == b"\x27\x00"
    assert ro.read(lba * 512, 3 * 512) == bytes(3 * 512)
    assert run(rw, rw_cdb(op, 2047, 2), bytes(1024), num_lbas=2048)[0] == scsi.RANGE
    assert run(rw, rw_cdb(op, 2048, 1), bytes(512), num_lbas=2048)[0] == scsi.RANGE


def test_scsi_emulation_unmap_write_same_and_sync(rw, ro):
    base = 5000
    assert run(rw, rw_cdb(0x2A, base, 64), b"\x11" * 64 * 512)[0] == scsi.OK
    plist = struct.pack(">HH4x", 6 + 32, 32) + struct.pack(">QI4x", base, 8) + struct.pack(">QI4x", 4096, 0)
    assert run(rw, cdb(0x42, 0, 0, 0, 0, 0, 0, 0, len(plist), 0), plist)[0] == scsi.OK
    assert rw.read(base * 512, 8 * 512) == bytes(8 * 512)
    assert rw.read((base + 8) * 512, 512) == b"\x11" * 512
    bad = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", VSIZE // 512 - 4, 8)
    assert run(rw, cdb(0x42, 0, 0, 0, 0, 0, 0, 0, len(bad), 0), bad)[0] == scsi.RANGE
    assert run(rw, cdb(0x42, *bytes(9)))[0] == scsi.OK                      # an empty list
    assert run(rw, cdb(0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0), bytes(4))[0] == scsi.INVALID_PARAM_LIST_LEN
    assert run(rw, cdb(0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0), bytes(4))[0] == scsi.INVALID_PARAM_LIST_LEN
    # WRITE SAME (16) with UNMAP, (10) of zeros, (10) of a pattern, and 0 blocks (WSNZ)
    ws_unmap = cdb(0x93, 0x08, *struct.pack(">Q", base + 8), 0, 0, 0, 16, 0, 0)
    assert run(rw, ws_unmap, bytes(512))[0] == scsi.OK
    assert rw.read((base + 8) * 512, 16 * 512) == bytes(16 * 512)
    ws_pat = cdb(0x41, 0, *struct.pack(">I", base + 30), 0, 0, 3, 0)
    assert run(rw, ws_pat, b"\x5a" * 512)[0] == scsi.OK
    assert rw.read((base + 30) * 512, 4 * 512) == b"\x5a" * 1536 + b"\x11" * 512
    assert run(rw, cdb(0x41, 0, 0, 0, 0, 64, 0, 0, 0, 0), b"\x5a" * 512)[0] == scsi.INVALID_CDB
    assert run(rw, cdb(0x41, 0, 0, 0, 0, 64, 0, 0, 1, 0), b"\x5a" * 100)[0] == scsi.INVALID_PARAM_LIST_LEN
    assert run(rw, cdb(0x35, *bytes(9)))[0] == scsi.OK
    assert run(rw, cdb(0x91, *bytes(15)))[0] == scsi.OK
    # read-only: SYNC is a no-op, UNMAP / WRITE SAME are write-protected
    assert run(ro, cdb(0x35, *bytes(9)))[0] == scsi.OK
    assert run(ro, cdb(0x42, 0, 0, 0, 0, 0, 0, 0, len(plist), 0), plist)[0] == PASSTHROUGH
    assert run(ro, ws_pat, b"\x5a" * 512)[0] == PASSTHROUGH


@pytest.mark.parametrize("text, want", [
    ("overlaybd//abs/config.v1.json", ("/abs/config.v1.json", "")),
    ("overlaybd//abs/config.v1.json;128", ("/abs/config.v1.json", "128")),
    ("overlaybd/rel.json", ("rel.json", "")),
])
def test_scsi_emulation_cfgstring(text, want):
    assert parse_cfgstring(text) == want


@pytest.mark.parametrize("text", ["qcow//x", "overlaybdx//x", "overlaybd", "overlaybd/"])
def test_scsi_emulation_cfgstring_rejected(text):
    with pytest.raises(ValueError):
        parse_cfgstring(text)
