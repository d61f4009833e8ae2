"""The data of the SCSI commands the TCMU handler emulates (libtcmu has no
emulation we can call without a kernel device), written from SPC-4/SBC-3.

Which opcode is which command, where a CDB's LBA, block count, allocation
or parameter list length are, and which commands are not supported: that is
the opcode table in tcmu_obd.serve._tcmu, and only there.  The data path looks a
CDB up there and calls `emulate(name, cdb, info, data_out)` with the table's
name for it: INQUIRY (standard, VPD 00 80 83 B0 B1 B2), MODE SENSE/SELECT
(6/10), READ CAPACITY (10/16), TEST UNIT READY, REQUEST SENSE and START STOP
UNIT; `parse_unmap` decodes an UNMAP parameter list for the handler.  The
data path cuts data-in to the allocation length and hands over exactly the
parameter list.  No I/O happens in this module.

Results are a status (TCMU_STS_* below) or a Sense(key, asc, ascq) the
caller turns into CHECK CONDITION, plus the data-in bytes.
"""
import struct
from collections import namedtuple

from tcmu_obd.errors import UsageError

# TCMU_STS_* (libtcmu 1.5.4; native/libtcmu.h)
OK = 0
NO_RESOURCE = 1
PASSTHROUGH_ERR = 2
BUSY = 3
WR_ERR = 4
RD_ERR = 5
INVALID_CMD = 7            # ILLEGAL REQUEST 20/00 invalid command operation code
INVALID_CDB = 8            # ILLEGAL REQUEST 24/00 invalid field in CDB
INVALID_PARAM_LIST = 9     # ILLEGAL REQUEST 26/00 invalid field in parameter list
INVALID_PARAM_LIST_LEN = 10  # ILLEGAL REQUEST 1A/00 parameter list length error
HW_ERR = 13
RANGE = 14                 # ILLEGAL REQUEST 21/00 LBA out of range
NOTSUPP_SAVE_PARAMS = 17   # ILLEGAL REQUEST 39/00 saving parameters not supported

# sense keys
NO_SENSE, ILLEGAL_REQUEST, DATA_PROTECT = 0x00, 0x05, 0x07

Sense = namedtuple("Sense", "key asc ascq")
WRITE_PROTECTED = Sense(DATA_PROTECT, 0x27, 0x00)

VENDOR = b"LIO-ORG"
PRODUCT = b"TCMU device"
REVISION = b"0002"
IEEE_COMPANY_ID = 0x001405          # the OUI LIO uses in NAA designators
VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)

# Block limits (VPD B0), in logical blocks.  2048 x 512 = 1 MiB: Linux sd
# then sets max_hw_sectors_kb = max_sectors_kb = 1024, so a 1 MiB read is
# one command (tcmu-runner reports 64 KiB, overlaybd leaves it unreported
# and gets the block layer's 1280 KiB default).
MAX_XFER_BLOCKS = 2048
MAX_UNMAP_BLOCKS = 1 << 22           # 2 GiB per UNMAP / WRITE SAME command
MAX_UNMAP_DESCRIPTORS = 256


class DeviceInfo:
    """What emulation needs to know about a device."""

    def __init__(self, num_lbas, block_size=512, writable=False, serial="",
                 write_cache=True, max_xfer_blocks=MAX_XFER_BLOCKS):
        self.num_lbas = num_lbas
        self.block_size = block_size
        self.writable = writable
        self.serial = serial
        self.write_cache = write_cache
        self.max_xfer_blocks = max_xfer_blocks

    @property
    def unmap(self):
        return self.writable


def be16(b, i):
    return (b[i] << 8) | b[i + 1]


def be32(b, i):
    return struct.unpack_from(">I", b, i)[0]


def be64(b, i):
    return struct.unpack_from(">Q", b, i)[0]


def check_range(info, lba, blocks):
    return RANGE if lba + blocks > info.num_lbas else OK


def parse_unmap(data, info):
    """UNMAP parameter list (all of it, as the CDB's length gives it) ->
    (status, [(lba, blocks), ...])."""
    data = bytes(data)
    if len(data) == 0:
        return OK, []
    if len(data) < 8:
        return INVALID_PARAM_LIST_LEN, []
    desc_len = be16(data, 2)
    if desc_len % 16 or 8 + desc_len > len(data):
        return INVALID_PARAM_LIST_LEN, []
    if desc_len // 16 > MAX_UNMAP_DESCRIPTORS:
        return INVALID_PARAM_LIST, []
    ranges = []
    for pos in range(8, 8 + desc_len, 16):
        lba, n = be64(data, pos), be32(data, pos + 8)
        if n > MAX_UNMAP_BLOCKS:
            return INVALID_PARAM_LIST, []
        if lba + n > info.num_lbas:
            return RANGE, []
        if n:
            ranges.append((lba, n))
    return OK, ranges


# ------------------------------------------------------------------ INQUIRY
def _pad(text, n):
    return text[:n].ljust(n, b" ")


def inquiry_standard(info):
    buf = bytearray(36)
    buf[0] = 0x00             # peripheral qualifier 0, direct-access block device
    buf[2] = 0x05             # VERSION: SPC-3
    buf[3] = 0x02             # RESPONSE DATA FORMAT 2
    buf[4] = len(buf) - 5     # ADDITIONAL LENGTH
    buf[7] = 0x02             # CMDQUE
    buf[8:16] = _pad(VENDOR, 8)
    buf[16:32] = _pad(PRODUCT, 16)
    buf[32:36] = _pad(REVISION, 4)
    return bytes(buf)


def _vpd(page, body):
    return bytes([0x00, page]) + struct.pack(">H", len(body)) + body


def _serial_hex(info):
    return "".join(c for c in info.serial.lower() if c in "0123456789abcdef")


def naa_designator(info):
    """NAA 6 (IEEE registered extended): company ID + 25 hex digits of the serial."""
    digits = (_serial_hex(info) + "0" * 25)[:25]
    value = (6 << 124) | (IEEE_COMPANY_ID << 100) | int(digits, 16)
    return value.to_bytes(16, "big")


def vpd_page(page, info):
    if page == 0x00:
        return _vpd(0x00, bytes(VPD_PAGES))
    if page == 0x80:
        return _vpd(0x80, info.serial.encode("ascii", "replace"))
    if page == 0x83:
        body = bytearray()
        naa = naa_designator(info)
        body += bytes([0x01, 0x03, 0x00, len(naa)]) + naa      # binary, LU, NAA
        t10 = _pad(VENDOR, 8) + info.serial.encode("ascii", "replace")
        body += bytes([0x02, 0x01, 0x00, len(t10)]) + t10      # ASCII, LU, T10 vendor ID
        return _vpd(0x83, bytes(body))
    if page == 0xB0:
        body = bytearray(60)
        body[0] = 0x01                                         # WSNZ
        struct.pack_into(">I", body, 4, info.max_xfer_blocks)  # MAXIMUM TRANSFER LENGTH
        if info.unmap:
            struct.pack_into(">I", body, 16, MAX_UNMAP_BLOCKS)        # MAXIMUM UNMAP LBA COUNT
            struct.pack_into(">I", body, 20, MAX_UNMAP_DESCRIPTORS)   # ... BLOCK DESCRIPTOR COUNT
            struct.pack_into(">Q", body, 32, MAX_UNMAP_BLOCKS)        # MAXIMUM WRITE SAME LENGTH
        return _vpd(0xB0, bytes(body))
    if page == 0xB1:
        body = bytearray(60)
        struct.pack_into(">H", body, 0, 1)                     # non-rotating medium
        return _vpd(0xB1, bytes(body))
    if page == 0xB2:
        body = bytearray(4)
        if info.unmap:
            body[1] = 0x80 | 0x40 | 0x20 | 0x04                # LBPU LBPWS LBPWS10 LBPRZ
            body[2] = 0x02                                     # thin provisioned
        return _vpd(0xB2, bytes(body))
    return None


def inquiry(cdb, info):
    evpd, page = cdb[1] & 0x01, cdb[2]
    if cdb[1] & 0xFE:
        return INVALID_CDB, b""
    if not evpd:
        if page:
            return INVALID_CDB, b""
        return OK, inquiry_standard(info)
    data = vpd_page(page, info)
    if data is None:
        return INVALID_CDB, b""
    return OK, data


# ------------------------------------------------------------------ READ CAPACITY
def read_capacity_10(info):
    last = info.num_lbas - 1
    return OK, struct.pack(">II", min(last, 0xFFFFFFFF), info.block_size)


def read_capacity_16(info):
    buf = bytearray(32)
    struct.pack_into(">QI", buf, 0, info.num_lbas - 1, info.block_size)
    if info.unmap:
        buf[14] = 0x80 | 0x40          # LBPME, LBPRZ
    return OK, bytes(buf)


# ------------------------------------------------------------------ MODE SENSE / SELECT
def _page_rw_recovery(changeable):
    return bytes([0x01, 0x0A]) + bytes(10)


def _page_caching(info, changeable):
    body = bytearray(18)
    if not changeable and info.write_cache:
        body[0] = 0x04                 # WCE
    return bytes([0x08, 0x12]) + bytes(body)


def _page_control(changeable):
    body = bytearray(10)
    if not changeable:
        body[1] = 0x10                 # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
        struct.pack_into(">H", body, 6, 0xFFFF)   # BUSY TIMEOUT PERIOD (page bytes 8-9): unlimited
    return bytes([0x0A, 0x0A]) + bytes(body)


MODE_PAGES = (0x01, 0x08, 0x0A)


def mode_page(page, info, changeable=False):
    if page == 0x01:
        return _page_rw_recovery(changeable)
    if page == 0x08:
        return _page_caching(info, changeable)
    if page == 0x0A:
        return _page_control(changeable)
    return None


def mode_sense(cdb, info, ten):
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if pc == 3:
        return NOTSUPP_SAVE_PARAMS, b""
    changeable = pc == 1
    if page == 0x3F:
        if subpage not in (0x00, 0xFF):
            return INVALID_CDB, b""
        pages = b"".join(mode_page(p, info, changeable) for p in MODE_PAGES)
    else:
        if subpage != 0:
            return INVALID_CDB, b""
        pages = mode_page(page, info, changeable)
        if pages is None:
            return INVALID_CDB, b""
    blockdesc = b""
    if not dbd:
        if llbaa:
            blockdesc = struct.pack(">Q4xI", info.num_lbas, info.block_size)
        else:
            blockdesc = struct.pack(">I", min(info.num_lbas, 0xFFFFFFFF)) + \
                (info.block_size & 0xFFFFFF).to_bytes(4, "big")
    devspec = 0x00 if info.writable else 0x80          # WP
    if ten:
        body = bytes([0x00, devspec, 0x01 if llbaa and blockdesc else 0x00, 0x00]) + \
            struct.pack(">H", len(blockdesc)) + blockdesc + pages
        return OK, struct.pack(">H", len(body)) + body
    body = bytes([0x00, devspec, len(blockdesc)]) + blockdesc + pages
    return OK, bytes([len(body)]) + body


def mode_select(cdb, info, data, ten):
    """Accept a parameter list (all of it) that changes nothing (no page is changeable)."""
    if cdb[1] & 0x01:                  # SP
        return NOTSUPP_SAVE_PARAMS
    data = bytes(data)
    if not data:
        return OK
    hdr = 8 if ten else 4
    if len(data) < hdr:
        return INVALID_PARAM_LIST_LEN
    bdl = be16(data, 6) if ten else data[3]
    pos = hdr + bdl
    if pos > len(data):
        return INVALID_PARAM_LIST_LEN
    while pos < len(data):
        if pos + 2 > len(data):
            return INVALID_PARAM_LIST_LEN
        code, length = data[pos] & 0x3F, data[pos + 1]
        if data[pos] & 0x40:           # SPF: no subpages are implemented
            return INVALID_PARAM_LIST
        given = data[pos:pos + 2 + length]
        current = mode_page(code, info)
        if current is None or len(given) != len(current):
            return INVALID_PARAM_LIST
        if given[2:] != current[2:]:
            return INVALID_PARAM_LIST
        pos += 2 + length
    return OK


# ------------------------------------------------------------------ dispatch
def request_sense(cdb):
    buf = bytearray(18)
    buf[0] = 0x70
    buf[2] = NO_SENSE
    buf[7] = 10
    return OK, bytes(buf)


EMULATIONS = {
    "test_unit_ready": lambda cdb, info, data: (OK, b""),
    "start_stop_unit": lambda cdb, info, data: (OK, b""),
    "request_sense": lambda cdb, info, data: request_sense(cdb),
    "inquiry": lambda cdb, info, data: inquiry(cdb, info),
    "read_capacity_10": lambda cdb, info, data: read_capacity_10(info),
    "read_capacity_16": lambda cdb, info, data: read_capacity_16(info),
    "mode_sense_6": lambda cdb, info, data: mode_sense(cdb, info, False),
    "mode_sense_10": lambda cdb, info, data: mode_sense(cdb, info, True),
    "mode_select_6": lambda cdb, info, data: (mode_select(cdb, info, data, False), b""),
    "mode_select_10": lambda cdb, info, data: (mode_select(cdb, info, data, True), b""),
}


def emulate(name, cdb, info, data_out=b""):
    """Answer the non-I/O command the opcode table calls `name`: (status or
    Sense, data-in bytes, not yet cut to the allocation length)."""
    try:
        fn = EMULATIONS[name]
    except KeyError:
        raise UsageError(f"SCSI emulation: no command named {name!r} (opcode 0x{cdb[0]:02x})") from None
    return fn(bytes(cdb), info, data_out)
