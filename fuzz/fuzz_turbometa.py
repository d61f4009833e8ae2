#!/usr/bin/env python3
"""Fuzz the TurboOCI meta blob's unpacker (tcmu_obd.image.turbometa.unpack_meta):
the turboOCIv1.tar.gz a registry hands us, unpacked into a layer dir.

Run: python fuzz/fuzz_turbometa.py -max_total_time=20   (or -runs=N, or a corpus dir)
Byte 0 picks the mode, the rest is the archive:
  0  the rest as it is (a .tar.gz, or anything)
  1  the rest is a tar: its first 8 header checksums repaired, then gzipped
  2  the rest is a tar: checksums repaired, not compressed
A result or an ObdError (tcmu_obd.errors) is fine; any other exception, a
hang, a huge allocation, or a file written outside the layer dir or under
a name other than the four known ones is a finding.  Not a test of the meta
layer or the gzip index it holds (fuzz_layer, fuzz_gzindex).
"""

import gzip
import os
import shutil
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
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


def TestOneInput(data):
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    if mode:
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
