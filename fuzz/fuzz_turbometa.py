#!/usr/bin/env python3
"""Fuzz the TurboOCI meta blob's unpacker (tcmu_obd.image.turbometa.unpack_meta):
the turboOCIv1.tar.gz a registry hands us, unpacked into a layer dir.

Run: python fuzz/fuzz_turbometa.py -max_total_time=20   (or -runs=N, or a corpus dir)
Byte 0 picks the mode, the rest is the archive:
  0  the rest as it is (a .tar.gz, or anything)
  1  the rest is a tar: its first 8 header checksums repaired, then gzipped
  2  the rest is a tar: checksums repaired, not compressed
  3  the rest is the recipe of an archive written with Python's tarfile:
     members (known and other names, every kind, GNU sparse headers and
     PAX GNU.sparse records), the format, then a gzip stream with a byte
     flipped, truncated or followed by junk, as the fuzzer chooses
A result or an ObdError (tcmu_obd.errors) is fine; any other exception, a
hang, a huge allocation, or a file written outside the layer dir or under
a name other than the four known ones is a finding.  Not a test of the meta
layer or the gzip index it holds (fuzz_layer, fuzz_gzindex).
"""

import gzip
import io
import os
import shutil
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    import tarfile          # instrumented: its branches guide the fuzzer
    from tcmu_obd.image import turbometa
    from tcmu_obd.errors import ObdError

TMP = tempfile.mkdtemp(prefix="fuzz-turbometa-")
ARCHIVE = os.path.join(TMP, "turboOCIv1.tar.gz")
LAYER = os.path.join(TMP, "layer")


def _fix_checksums(data):
    buf = bytearray(data)
    for start in range(0, min(len(buf), 8 * 512) - 511, 512):
        block = buf[start:start + 512]
        if block == bytes(512):
            continue
        block[148:156] = b" " * 8
        buf[start + 148:start + 156] = b"%06o\0 " % sum(block)
    return bytes(buf)


_NAMES = list(turbometa.META_NAMES) + ["./erofs.fs.meta", "x/gzip.meta", "../ext4.fs.meta", ".", "other"]
_KINDS = [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
          tarfile.GNUTYPE_SPARSE, tarfile.CONTTYPE, tarfile.FIFOTYPE]
_PAX = [{}, {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(1 << 40),
             "GNU.sparse.name": "erofs.fs.meta"},
        {"GNU.sparse.size": str(1 << 40), "GNU.sparse.numblocks": "1", "GNU.sparse.offset": "0",
         "GNU.sparse.numbytes": "0"},
        {"size": "-1"}, {"path": "gzip.meta"}]


def _recipe(data):
    fdp = atheris.FuzzedDataProvider(data)
    fmt = fdp.PickValueInList([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for _ in range(fdp.ConsumeIntInRange(0, 5)):
            ti = tarfile.TarInfo(fdp.PickValueInList(_NAMES))
            ti.type = fdp.PickValueInList(_KINDS)
            ti.linkname = "erofs.fs.meta" if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            ti.size = fdp.ConsumeIntInRange(0, 4000) if ti.isreg() else 0
            if fmt == tarfile.PAX_FORMAT:
                ti.pax_headers = dict(fdp.PickValueInList(_PAX))
            try:
                t.addfile(ti, io.BytesIO(fdp.ConsumeBytes(ti.size).ljust(ti.size, b"m")) if ti.size else None)
            except (ValueError, tarfile.TarError):
                continue
    raw = bytearray(buf.getvalue())
    if raw and fdp.ConsumeBool():                 # a GNU sparse map claiming a huge file
        k = fdp.ConsumeIntInRange(0, len(raw) // 512 - 1) * 512
        raw[k + 483:k + 495] = b"%011o\0" % fdp.ConsumeIntInRange(0, 1 << 33)
        raw = bytearray(_fix_checksums(bytes(raw)))
    gz = bytearray(gzip.compress(bytes(raw), fdp.ConsumeIntInRange(0, 9), mtime=0))
    how = fdp.ConsumeIntInRange(0, 3)
    if how == 1 and gz:
        gz[fdp.ConsumeIntInRange(0, len(gz) - 1)] ^= 1 << fdp.ConsumeIntInRange(0, 7)
    elif how == 2:
        del gz[fdp.ConsumeIntInRange(0, len(gz)):]
    elif how == 3:
        gz += fdp.ConsumeBytes(8)
    return bytes(gz)


def TestOneInput(data):
    if not data:
        return
    mode, body = data[0] % 4, data[1:]
    if mode == 3:
        body = _recipe(body)
    elif mode:
        body = _fix_checksums(body)
    if mode == 1:
        body = gzip.compress(body, 1, mtime=0)
    with open(ARCHIVE, "wb") as f:
        f.write(body)
    shutil.rmtree(LAYER, ignore_errors=True)
    os.mkdir(LAYER)
    try:
        seen = turbometa.unpack_meta(ARCHIVE, LAYER, "fuzz")
    except ObdError as e:
        assert str(e).startswith("fuzz: "), e
        seen = None
    left = set(os.listdir(LAYER))
    assert left <= set(turbometa.META_NAMES), left
    assert sorted(os.listdir(TMP)) == ["layer", "turboOCIv1.tar.gz"], os.listdir(TMP)
    if seen is not None:
        assert seen == left and any(n.endswith(".fs.meta") for n in seen), (seen, left)


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
