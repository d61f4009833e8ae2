"""LSMT on-disk format: the 4 KiB header/trailer block, UUID text, and
loading the index of a read-only layer (committed, or a sealed RW file).

This module parses and packs bytes and validates them against the format (docs/formats.md, LSMT);
it does not open files by path, detect wrappers (tcmu_obd.image.layer does), write
RW layers (tcmu_obd.image.rw) or read data (the core does).
"""
import struct
import uuid as _uuid
from dataclasses import dataclass

from tcmu_obd import core
from tcmu_obd.errors import FormatError

SECTOR = 512
HT_SPACE = 4096
TAG_SIZE = 256
MAX_RO_INDEX = 1_000_000
MAX_INDEX = 128_000_000
MAX_LENGTH = (1 << 14) - 1
INVALID_OFFSET = (1 << 50) - 1
MAX_IO = 4 << 20

MAGIC0 = bytes.fromhex("4C534D5400010200")
MAGIC1 = bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")

FLAG_HEADER = 0x01
FLAG_DATA = 0x02
FLAG_SEALED = 0x04
FLAG_SPARSE = 0x10

NULL_UUID = "00000000-0000-0000-0000-000000000000"

_HT = struct.Struct("<8s16sIIQQQ37s37sHBB256s")   # 390 bytes
assert _HT.size == 390


def valid_uuid(text):
    """True for a 36-character UUID with dashes at 8, 13, 18 and 23."""
    if not isinstance(text, str) or len(text) != 36:
        return False
    for i, ch in enumerate(text):
        if i in (8, 13, 18, 23):
            if ch != "-":
                return False
        elif ch not in "0123456789abcdefABCDEF":
            return False
    return True


def uuid_text(text):
    """The on-disk form of a UUID argument: uppercase when valid, else null."""
    return text.upper() if valid_uuid(text) else NULL_UUID


def random_uuid():
    """A random v4 UUID in overlaybd's text form (bytes in memory order)."""
    return str(_uuid.uuid4()).upper()


@dataclass
class LsmtHeader:
    """One header or trailer block."""
    flags: int
    index_offset: int = 0
    index_size: int = 0
    virtual_size: int = 0
    uuid: str = NULL_UUID
    parent_uuid: str = NULL_UUID
    user_tag: bytes = b""
    version: int = 1
    sub_version: int = 1
    reserved: int = 0

    @property
    def is_header(self):
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data(self):
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self):
        return bool(self.flags & FLAG_SEALED)

    @property
    def is_sparse(self):
        return bool(self.flags & FLAG_SPARSE)

    def pack(self):
        tag = self.user_tag
        if len(tag) > TAG_SIZE:
            raise FormatError("<header>", "user_tag", len(tag), f"longer than {TAG_SIZE} bytes")
        body = _HT.pack(MAGIC0, MAGIC1, _HT.size, self.flags, self.index_offset, self.index_size,
                        self.virtual_size, _uuid_field(self.uuid), _uuid_field(self.parent_uuid),
                        self.reserved, self.version, self.sub_version, tag)
        return body + bytes(HT_SPACE - len(body))

    @classmethod
    def unpack(cls, raw, path, where="header"):
        """Parse a 4096-byte block; checks the magic only."""
        if len(raw) < _HT.size:
            raise FormatError(path, where, len(raw), f"file too short for an LSMT {where} "
                              f"(needs {HT_SPACE} bytes)")
        (m0, m1, _size, flags, ioff, isize, vsize, u, pu, reserved, ver, sub,
         tag) = _HT.unpack_from(raw)
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise FormatError(path, f"{where} magic", m0 + m1, "not an LSMT file")
        return cls(flags, ioff, isize, vsize, _uuid_parse(u), _uuid_parse(pu),
                   tag.rstrip(b"\0"), ver, sub, reserved)


def _uuid_field(text):
    return text.encode("ascii")[:36].ljust(36, b"\0") + b"\0"


def _uuid_parse(raw):
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def is_lsmt(raw):
    """True when `raw` starts with the LSMT magic."""
    return raw[:8] == MAGIC0 and raw[8:24] == MAGIC1


def read_header(backing, path, need_data=True):
    """Parse and check the header block at byte 0 of a backing."""
    hdr = LsmtHeader.unpack(backing.pread(0, HT_SPACE), path, "header")
    if not hdr.is_header:
        raise FormatError(path, "header flags", hdr.flags, "HEADER bit (0x1) is clear")
    if need_data and not hdr.is_data:
        raise FormatError(path, "header flags", hdr.flags, "TYPE_DATA bit (0x2) is clear")
    return hdr


def load_ro(backing, path, warp=False):
    """Header, trailer and index of a committed or sealed layer (the
    trailer locates the index; padding records are dropped; order and
    moffset ranges are checked).  Returns (header, trailer, Index).

    warp: the layer is a warp (TurboOCI meta) layer opened with a target:
    the stored tags are kept, less the smallest one present (overlaybd's
    rule), and must then be 0 (data in this file, range-checked) or 1 (data
    in the target, checked by the caller, who knows the target's size)."""
    size = backing.size
    if size < 2 * HT_SPACE:
        why = "truncated: " if is_lsmt(backing.pread(0, 24)) else "too short: "
        raise FormatError(path, "file size", size, f"{why}an LSMT layer needs at least {2 * HT_SPACE} "
                          "bytes (header and trailer)")
    header = read_header(backing, path)
    toff = size - HT_SPACE
    tail = backing.pread(toff, HT_SPACE)
    if not is_lsmt(tail):
        # committed and sealed layers end with the trailer: none there means the
        # file was cut short, or it is an RW data file that was never sealed
        unsealed = "" if header.is_sealed else ", or an unsealed RW data file (commit or seal it first)"
        raise FormatError(path, "trailer magic", tail[:24],
                          f"no LSMT trailer in the last {HT_SPACE} bytes of the {size}-byte file: "
                          f"truncated, or the trailer is damaged{unsealed}")
    trailer = LsmtHeader.unpack(tail, path, "trailer")
    if trailer.is_header:
        raise FormatError(path, "trailer flags", trailer.flags,
                          "HEADER bit set: no trailer (an unsealed RW data file? commit or seal it first)")
    if not (trailer.is_data and trailer.is_sealed):
        raise FormatError(path, "trailer flags", trailer.flags, "TYPE_DATA and SEALED must both be set")
    if trailer.index_size > MAX_RO_INDEX:
        raise FormatError(path, "trailer index_size", trailer.index_size,
                          f"more than {MAX_RO_INDEX} records")
    if trailer.index_offset % SECTOR or trailer.index_offset < HT_SPACE:
        raise FormatError(path, "trailer index_offset", trailer.index_offset,
                          f"must be 512-aligned and at least {HT_SPACE}")
    if trailer.index_offset > toff:
        raise FormatError(path, "trailer index_offset", trailer.index_offset,
                          f"past the trailer at byte {toff}")
    if trailer.index_size * 16 > toff - trailer.index_offset:
        raise FormatError(path, "trailer index_size", trailer.index_size,
                          f"{trailer.index_size} records at byte {trailer.index_offset} run past "
                          f"the trailer at byte {toff}")
    raw = backing.pread(trailer.index_offset, trailer.index_size * 16)
    index = core.Index.from_raw(raw, keep_tags=warp)
    if warp:
        _lo, bad = index.normalise_tags(1)
        if bad >= 0:
            raise FormatError(path, f"index record {bad} tag", index.record(bad)[4] + _lo,
                              f"a warp layer's tags are {_lo} (this file) and {_lo + 1} (the target) "
                              "only (the smallest tag present counts as 0)")
    try:
        check_index(index, path, 8, trailer.index_offset // SECTOR, tag=0 if warp else -1)
    except FormatError as e:
        if warp or core.Index.from_raw(raw, keep_tags=True).normalise_tags(0)[1] < 0:
            raise
        # mixed tags: a TurboOCI meta layer, whose tag-1 records point into its target
        raise FormatError(path, e.field, e.value, f"{e.why}; the records carry two tags: a TurboOCI meta "
                          "layer opened without its targetFile / targetDigest?") from None
    index.build_search()
    return header, trailer, index


def check_index(index, path, lo, hi, area="the layer's data area", tag=-1):
    """Records sorted, non-overlapping, and backed by [lo, hi) sectors
    (tag >= 0: only the records with that tag are range-checked)."""
    bad = index.check_sorted()
    if bad >= 0:
        prev, rec = index.record(bad - 1), index.record(bad)
        raise FormatError(path, f"index record {bad} offset", rec[0],
                          f"overlaps the previous record [{prev[0]}, {prev[0] + prev[1]}) (sectors)")
    bad = index.check_moffset(lo, hi, tag)
    if bad >= 0:
        rec = index.record(bad)
        raise FormatError(path, f"index record {bad} moffset", rec[2],
                          f"{'zeroed' if rec[3] else 'data'} record of {rec[1]} sectors outside "
                          f"{area} [{lo}, {hi}) (sectors)")
