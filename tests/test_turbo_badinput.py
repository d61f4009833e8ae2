"""Bad input to turboOCI-apply's tar header walk (build.turbo.HeaderWalk)
and to the --import header dump: each case is a finding of fuzz/fuzz_turbo.py
kept as a regression test.  A bad tar or dump gives an ApplyError naming
the member, the field and the value (or the byte where the walk stopped),
never a hang, another exception or members that the tar does not hold.
"""
import io
import tarfile

import pytest

from tcmu_obd.build import turbo
from tcmu_obd.errors import ApplyError


def one_member_tar(pax=None, kind=tarfile.REGTYPE, size=3, fmt=tarfile.PAX_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        ti = tarfile.TarInfo("a")
        ti.type, ti.size = kind, size
        ti.pax_headers = dict(pax or {})
        t.addfile(ti, io.BytesIO(bytes(size)))
        t.addfile(tarfile.TarInfo("b"))
    return buf.getvalue()


def walk(raw, tmp_path, *, seekable, from_dump=False, limit=10):
    """The walk's (name, size, content offset of a regular file) list, at most `limit` members (a walk
    that loops would go past it)."""
    p = tmp_path / "in.tar"
    p.write_bytes(raw)
    out = []
    with open(p, "rb") as f:
        for info, content, _blocks in turbo.HeaderWalk(f if seekable else io.BytesIO(raw),
                                                       from_dump=from_dump, seekable=seekable):
            out.append((info.name, info.size, content if info.type in turbo.REG_TYPES else None))
            assert len(out) <= limit, out
    return out


@pytest.mark.parametrize("seekable", [True, False])
@pytest.mark.parametrize("value", ["-1536", "-1", "-9223372036854775808"])
def test_negative_pax_size_is_refused(tmp_path, seekable, value):
    # before: the walk seeked back by the negative size and read the same
    # headers again forever (seekable), or yielded a member of negative size
    raw = one_member_tar({"size": value})
    with pytest.raises(ApplyError) as e:
        walk(raw, tmp_path, seekable=seekable)
    assert "a:" in str(e.value) and "size" in str(e.value) and value in str(e.value)


def test_negative_base256_size_is_refused(tmp_path):
    # a GNU base-256 size field can hold a negative number too
    raw = bytearray(one_member_tar(fmt=tarfile.GNU_FORMAT))
    raw[124:136] = b"\xff" * 12
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    with pytest.raises(ApplyError) as e:
        walk(bytes(raw), tmp_path, seekable=True)
    assert "a:" in str(e.value) and "size -1" in str(e.value)


def test_dump_holds_no_data_of_other_members(tmp_path):
    # a member type with data that is not a regular file (here a GNU volume
    # header, "V"): --export copies its header only, so --import must not
    # skip data after it (before: it swallowed the next headers and failed
    # with "truncated tar")
    raw = one_member_tar(kind=b"V", size=2000)
    want = walk(raw, tmp_path, seekable=True)
    assert [m[0] for m in want] == ["a", "b"]
    (tmp_path / "l.tar").write_bytes(raw)
    inp = turbo.TurboInput(str(tmp_path / "l.tar"))
    try:
        turbo.export_headers(inp, str(tmp_path / "dump"))
    finally:
        inp.close()
    dump = (tmp_path / "dump").read_bytes()
    assert walk(dump, tmp_path, seekable=True, from_dump=True) == want


@pytest.mark.parametrize("key,value", [("uid", "-5"), ("gid", str(1 << 32))])
def test_uid_gid_outside_32_bits_are_refused(tmp_path, key, value):
    with pytest.raises(ApplyError) as e:
        walk(one_member_tar({key: value}), tmp_path, seekable=True)
    assert "a:" in str(e.value) and f"{key} {value}" in str(e.value)


@pytest.mark.parametrize("fmt,pax,shown", [
    (tarfile.PAX_FORMAT, {"mtime": "99999999999999999999999"}, "mtime 99999999999999999999999"),
    (tarfile.PAX_FORMAT, {"mtime": "-9223372036854775809.5"}, "mtime -9223372036854775809.5"),
    (tarfile.PAX_FORMAT, {"atime": "1" + "0" * 30}, "atime 1" + "0" * 30),
    (tarfile.GNU_FORMAT, None, f"mtime {1 << 70}"),
])
def test_times_outside_64_bit_seconds_are_refused(tmp_path, fmt, pax, shown):
    # before: the erofs writer failed with struct.error (i_mtime is 64-bit)
    # and the ext4 side's utime with OverflowError
    raw = bytearray(one_member_tar(pax, fmt=fmt))
    if pax is None:                     # a base-256 mtime field in the GNU header
        k = 0
        raw[k + 136:k + 148] = b"\x80" + (1 << 70).to_bytes(11, "big")
        raw[k + 148:k + 156] = b" " * 8
        raw[k + 148:k + 156] = b"%06o\0 " % sum(raw[k:k + 512])
    with pytest.raises(ApplyError) as e:
        walk(bytes(raw), tmp_path, seekable=True)
    assert "a:" in str(e.value) and shown in str(e.value)
    # the erofs entries of the same tar: the same error, named by the input
    with pytest.raises(ApplyError) as e:
        list(turbo.erofs_entries(turbo.HeaderWalk(io.BytesIO(bytes(raw))), "l.tar"))
    assert str(e.value).startswith("l.tar: a:") and shown in str(e.value)
