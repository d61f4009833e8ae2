"""Bad input to the erofs meta-layer writer and reader: every refusal is an
ObdError that names the entry (or the image, field and value); a damaged
lower image raises FormatError, never a crash or a hang (a directory cycle
included).  The fuzz harness fuzz/fuzz_erofs.py covers random damage."""
import io
import struct
import tarfile

import pytest

from erofs_util import D, E, R, S, build, tar_bytes

from tcmu_obd.errors import ApplyError, FormatError, UnsupportedError, UsageError
from tcmu_obd.format.erofs import ErofsBuilder, TarEntry, entries_from_tar
from tcmu_obd.format.erofs_layout import SB_OFFSET
from tcmu_obd.format.erofs_read import ErofsReader


def _builder_error(entries, exc, *needles):
    b = ErofsBuilder(name="L")
    with pytest.raises(exc) as info:
        for e in entries:
            b.add(e)
        b.finish()
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


def F(path, **kw):
    kw.setdefault("type", "file")
    return TarEntry(path=path, **kw)


@pytest.mark.parametrize("entries,exc,needles", [
    ([F("a", type="socket")], UsageError, ["L: a", "'socket'"]),
    ([F("a", size=10)], UsageError, ["L: a", "data_offset = None"]),
    ([F("a", size=10, data_offset=100)], UsageError, ["data_offset = 100", "512"]),
    ([F("a", uid=-1)], UsageError, ["uid = -1"]),
    ([F("a", gid=2**32)], UsageError, ["gid = 4294967296"]),
    ([F("a", mode="644")], UsageError, ["mode = '644'"]),
    ([F("a", xattrs={"user.x": "str"})], UsageError, ["user.x", "bytes"]),
    ([F("a", type="hardlink", linkname="nope")], ApplyError, ["L: a", "'nope'", "does not exist"]),
    ([F("d", type="dir"), F("a", type="hardlink", linkname="d")], ApplyError, ["is a directory"]),
    ([F("a", type="hardlink", linkname="/")], ApplyError, ["root directory"]),
    ([F("x" * 256)], ApplyError, ["256 bytes", "255"]),
    ([F("d/" + "y" * 300 + "/f")], ApplyError, ["300 bytes"]),
    ([F("a", type="symlink", linkname="")], ApplyError, ["symlink target of 0 bytes"]),
    ([F("a", type="symlink", linkname="t" * 4096)], ApplyError, ["4096 bytes"]),
    ([F("a", xattrs={"system.other": b"v"})], UnsupportedError, ["L: a", "system.other"]),
    ([F("a", xattrs={"trusted.": b"v"})], UnsupportedError, ["'trusted.'"]),
    ([F("a", xattrs={"user." + "n" * 256: b"v"})], UnsupportedError, ["longer than 255"]),
    ([F("a", xattrs={"user.big": b"v" * 65536})], UnsupportedError, ["65536 bytes"]),
    ([F("a", type="char", devmajor=4096, devminor=1)], UnsupportedError, ["4096:1"]),
    ([F("a", type="block", devmajor=1, devminor=2**20)], UnsupportedError, ["12:20 bits"]),
    ([F("f"), F("f/g")], ApplyError, ["L: f/g", "f in f is not a directory"]),
    ([F("l1", type="symlink", linkname="l2"), F("l2", type="symlink", linkname="l1"), F("l1/x")],
     ApplyError, ["too many levels of symbolic links"]),
    ([F(".", type="file")], ApplyError, ["root can only be a directory"]),
    ([F("a", type="hardlink", linkname="f/x"), ], ApplyError, ["hard link target 'f/x'", "does not exist"]),
])
def test_erofs_badinput_entries_refused(entries, exc, needles):
    _builder_error(entries, exc, *needles)


def test_erofs_badinput_builder_usage():
    with pytest.raises(UsageError, match="block size 8192"):
        ErofsBuilder(block_size=8192)
    b = ErofsBuilder()
    b.finish()
    with pytest.raises(UsageError, match="after finish"):
        b.add(F("a"))


def test_erofs_badinput_not_a_tar():
    with pytest.raises(ApplyError, match="T: not a tar archive"):
        list(entries_from_tar(io.BytesIO(b"\x01" * 1024), name="T"))


def _tar_with(ti):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        t.addfile(ti)
    buf.seek(0)
    return buf


def test_erofs_badinput_tar_types_refused():
    ti = tarfile.TarInfo("sparse")
    ti.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(UnsupportedError, match="sparse: GNU sparse"):
        list(entries_from_tar(_tar_with(ti)))
    ti = tarfile.TarInfo("odd")
    ti.type = b"Z"
    with pytest.raises(UnsupportedError, match="odd: tar entry type 'Z'"):
        list(entries_from_tar(_tar_with(ti)))


# -- the reader ---------------------------------------------------------------------------------------------

def _image():
    tar = tar_bytes([E(".", D), E("d", D), E("d/f", R, b"data", xattrs={"user.k": b"v"}),
                     E("d/s", S, linkname="f")])
    writes, _m, b = build(tar)
    disk = bytearray(b.end_block * 4096)
    for off, data in writes:
        disk[off:off + len(data)] = data
    return disk


def _nid_off(disk, path):
    r = ErofsReader(lambda o, n: disk[o:o + n])
    node = r.tree()
    for c in path:
        node = node.children[c]
    return r.meta_blkaddr * 4096 + node.nid * 32, node


def _read(disk):
    return ErofsReader(lambda o, n: bytes(disk[o:o + n]), name="low").tree()


def _damaged(where, fmt, value):
    disk = _image()
    if isinstance(where, int):
        off = where
    else:
        off = _nid_off(disk, where[0])[0] + where[1]
    struct.pack_into(fmt, disk, off, value)
    return disk


@pytest.mark.parametrize("where,fmt,value,field", [
    (SB_OFFSET, "<I", 0x12345678, "superblock.magic"),
    (SB_OFFSET + 12, "<B", 20, "superblock.blkszbits"),
    (SB_OFFSET + 80, "<I", 0x4, "superblock.feature_incompat"),
    ((["d", "f"], 0), "<H", 0x10, "i_format"),
    ((["d", "f"], 0), "<H", 1 | 1 << 1, "datalayout"),        # compressed
    ((["d", "f"], 0), "<H", 1 | 4 << 1, "datalayout"),        # chunk-based
    ((["d", "f"], 4), "<H", 0o170644, "i_mode"),
    ((["d", "f"], 4), "<H", 0o010644, "file_type"),           # a fifo the dirent calls a file
    ((["d", "f"], 40), "<I", 10**9, "i_mtime_nsec"),
    ((["d", "f"], 64 + 12 + 1), "<B", 9, "e_name_index"),     # the first xattr entry
    ((["d", "f"], 64 + 12 + 2), "<H", 5000, "e_value_size"),
    ((["d", "f"], 64 + 4), "<B", 200, "h_shared_count"),
    ((["d", "s"], 8), "<Q", 0, "i_size"),                     # an empty symlink
    ((["d", "s"], 8), "<Q", 5000, "i_size"),
    ((["d"], 8), "<Q", 4000, "i_size"),                       # the dir tail crosses its block
])
def test_erofs_badinput_reader_fields(where, fmt, value, field):
    disk = _damaged(where, fmt, value)
    with pytest.raises(FormatError) as info:
        _read(disk)
    assert str(info.value).startswith("low: "), str(info.value)
    assert field in info.value.field, (field, info.value.field)


def _dirent_offsets(disk, path):
    """Disk offset of each dirent of the (inline) directory at `path`."""
    off, node = _nid_off(disk, path)
    start = off + 64                                 # no xattrs on these directories
    count = struct.unpack_from("<H", disk, start + 8)[0] // 12
    return start, count


def test_erofs_badinput_reader_dirents():
    disk = _image()
    start, count = _dirent_offsets(disk, ["d"])
    bad = bytearray(disk)
    struct.pack_into("<H", bad, start + 8, 7)                     # nameoff[0] not a multiple of 12
    with pytest.raises(FormatError, match=r"nameoff\[0\] = 7"):
        _read(bad)
    bad = bytearray(disk)
    struct.pack_into("<H", bad, start + 12 + 8, 4000)             # nameoff[1] past the names
    with pytest.raises(FormatError, match=r"nameoff\[0\] = 48.*out of the block"):
        _read(bad)
    bad = bytearray(disk)
    struct.pack_into("<B", bad, start + 12 * (count - 1) + 10, 9)  # file_type 9
    with pytest.raises(FormatError, match="file_type"):
        _read(bad)


def test_erofs_badinput_reader_cycle_and_truncation():
    disk = _image()
    root_nid = struct.unpack_from("<H", disk, SB_OFFSET + 14)[0]
    start, count = _dirent_offsets(disk, ["d"])
    # point d's entry "f" (after ".", "..") at the root directory: a cycle
    names = []
    for i in range(count):
        nameoff = struct.unpack_from("<H", disk, start + 12 * i + 8)[0]
        names.append(nameoff)
    f_index = 2
    bad = bytearray(disk)
    struct.pack_into("<QHB", bad, start + 12 * f_index, root_nid, names[f_index], 2)
    with pytest.raises(FormatError, match="reached twice"):
        _read(bad)
    with pytest.raises(FormatError, match="short read"):
        _read(disk[:4096 + 40])
    with pytest.raises(FormatError, match="superblock"):
        _read(disk[:1100])


def test_erofs_badinput_damaged_lower_names_the_layer():
    disk = _damaged(SB_OFFSET, "<I", 0)
    with pytest.raises(FormatError, match=r"^L \(lower\): superblock.magic"):
        ErofsBuilder(lower=lambda o, n: bytes(disk[o:o + n]), name="L")
