#!/usr/bin/env python3
"""Fuzz turboOCI-apply's input side (tcmu_obd.build.turbo): the tar header
walk (HeaderWalk, over TurboInput: plain, gzip with its index built in the
same pass) of a layer tar, the --export dump it writes, and the --import
walk of a dump, up to the erofs entries it feeds (erofs_entries).

Run: python fuzz/fuzz_turbo.py -max_total_time=20   (or -runs=N, or a corpus dir)
Byte 0 picks the mode, the rest is the input file:
  bit 0  the rest is a header dump (--import); otherwise a tar
  bit 1  repair the tar checksums of the first 8 blocks first (gets past
         tarfile's checksum gate without a corpus)
  bit 2  gzip the rest first (TurboInput's gzip path, index writer on)
  bit 3  read through a pipe-like stream (no seeking) instead of the file
  bit 4  for a tar: --export it and walk the dump with --import semantics,
         which must yield the same members
  bit 5  run the members through erofs_entries and an ErofsBuilder (the
         metadata of an erofs meta layer, as --fstype erofs makes it)
  bit 6  the rest is not a tar but the recipe of one, written with Python's
         tarfile (PAX or GNU format): member kinds, names, sizes and PAX
         records (size, uid, gid, mtime, path, linkpath, xattrs) with values
         chosen by the fuzzer, negative and huge ones included
A result or an ObdError (tcmu_obd.errors) is fine; any other exception,
a hang or a huge allocation is a finding.  Not a test of the ext4 writer
or the erofs reader (fuzz_ext4, fuzz_erofs) nor of the gzip index parser
(fuzz_gzindex).
"""

import gzip
import io
import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    import tarfile          # instrumented: its branches guide the fuzzer
    from tcmu_obd.build import turbo
    from tcmu_obd.errors import ObdError
    from tcmu_obd.format.erofs import ErofsBuilder

TMP = tempfile.mkdtemp(prefix="fuzz-turbo-")
INPUT = os.path.join(TMP, "layer")
DUMP = os.path.join(TMP, "dump")
INDEX = os.path.join(TMP, "gzip.meta")


_PAX_KEYS = ["size", "uid", "gid", "mtime", "path", "linkpath", "SCHILY.xattr.user.k", "atime",
             "uname", "GNU.sparse.size", "comment"]
_PAX_VALUES = ["-1", "-512", "-1536", "0", "1", "1e3", " 7", "1_0", "99999999999999999999", "3.5", "",
               "a/../b", "/", ".", "..", "x" * 300, "\udcff", "-9223372036854775808", "nan"]
_KINDS = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
          tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, b"V", b"Z"]


def _recipe_tar(data):
    """A tar written by tarfile from the fuzzer's choices."""
    fdp = atheris.FuzzedDataProvider(data)
    fmt = tarfile.PAX_FORMAT if fdp.ConsumeBool() else tarfile.GNU_FORMAT
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as t:
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            ti = tarfile.TarInfo(fdp.PickValueInList(["a", "d/f", "x" * 120, "./e", "w/.wh.z", "o/.wh..wh..opq"])
                                 + fdp.ConsumeUnicodeNoSurrogates(4))
            ti.type = fdp.PickValueInList(_KINDS)
            ti.linkname = fdp.PickValueInList(["a", "d/f", "t" * 130, "", "../../x"])
            ti.mtime = fdp.PickValueInList([0, 1700000000, -1, 1 << 40])
            ti.uid = fdp.PickValueInList([0, 1000, (1 << 21) - 1])
            ti.devmajor, ti.devminor = fdp.ConsumeIntInRange(0, 4095), fdp.ConsumeIntInRange(0, 255)
            size = fdp.ConsumeIntInRange(0, 3000)
            if fmt == tarfile.PAX_FORMAT:
                for _ in range(fdp.ConsumeIntInRange(0, 3)):
                    key = fdp.PickValueInList(_PAX_KEYS)
                    ti.pax_headers[key] = (fdp.PickValueInList(_PAX_VALUES) if fdp.ConsumeBool()
                                           else str(fdp.ConsumeIntInRange(-(1 << 20), 1 << 20)))
            ti.size = size if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, b"V", b"Z") else 0
            try:
                t.addfile(ti, io.BytesIO(bytes(ti.size)) if ti.size else None)
            except (ValueError, UnicodeError, tarfile.TarError):
                continue
    return buf.getvalue()


def _fix_checksums(data):
    buf = bytearray(data)
    for start in range(0, min(len(buf), 8 * 512) - 511, 512):
        block = buf[start:start + 512]
        if block == bytes(512):
            continue
        block[148:156] = b" " * 8
        buf[start + 148:start + 156] = b"%06o\0 " % sum(block)
    return bytes(buf)


class _Pipe(io.RawIOBase):
    """A non-seekable view of a file (reads only; short reads allowed)."""

    def __init__(self, f):
        self.f = f

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(min(len(b), 7000))
        b[:len(data)] = data
        return len(data)


def _members(walk, erofs):
    out = []
    if erofs:
        b = ErofsBuilder(4096, name="fuzz")
        for e in turbo.erofs_entries(walk, "fuzz"):
            assert e.data_offset is None or e.data_offset >= 0, e
            out.append((e.path, e.type, e.size, e.data_offset))
            b.add(e)
        b.finish()
        return out
    for info, content, blocks in walk:
        assert content >= 0 and content % 512 == 0, content
        assert blocks and all(len(b) % 512 == 0 for b in blocks), [len(b) for b in blocks]
        reg = info.type in turbo.REG_TYPES
        out.append((info.name, info.type, info.size if reg else 0, info.linkname, content if reg else None))
    return out


def TestOneInput(data):
    if not data:
        return
    mode, body = data[0], data[1:]
    dump, erofs = bool(mode & 1), bool(mode & 32)
    if mode & 64:
        body = _recipe_tar(body)
        dump = False
    elif mode & 2:
        body = _fix_checksums(body)
    if mode & 4:
        body = gzip.compress(body, 1, mtime=0)
    with open(INPUT, "wb") as f:
        f.write(body)
    try:
        inp = turbo.TurboInput(INPUT, None if dump else INDEX)
    except ObdError:
        return
    try:
        stream, seekable = inp.stream, inp.seekable
        if mode & 8:
            stream, seekable = _Pipe(inp.stream), False
        walk = turbo.HeaderWalk(stream, from_dump=dump, seekable=seekable)
        try:
            got = _members(walk, erofs)
        except ObdError:
            return
        assert walk.pos <= max(len(body), 1 << 40), walk.pos
        if not dump and mode & 16:
            inp.close()
            inp = turbo.TurboInput(INPUT, None)
            try:
                turbo.export_headers(inp, DUMP)
            except ObdError as e:
                raise AssertionError(f"the walk read the tar but --export failed: {e}") from None
            with open(DUMP, "rb") as f:
                again = _members(turbo.HeaderWalk(f, from_dump=True), erofs)
            assert again == got, (again, got)
        elif not dump:
            try:
                inp.finish()
            except ObdError:
                pass
    finally:
        inp.close()


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
