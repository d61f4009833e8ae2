#!/usr/bin/env python3
"""Fuzz tcmu_obd.format.tar.detect with arbitrary blobs.

Run: python fuzz/fuzz_tar.py -max_total_time=20   (or -runs=N, or a corpus dir)
An input starting with "T" has its tar checksums repaired first.
detect may return None or a payload range inside the blob, or raise
FormatError; anything else escapes and is reported as a finding.
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    from tcmu_obd.format import tar
    from tcmu_obd.errors import FormatError


def _fix_headers(data):
    """Pad to 4 blocks, make block 0 a ustar header and give blocks 0-3 valid
    checksums, so the fuzzer gets past the checksum gate without a corpus."""
    buf = bytearray(data[:2048].ljust(2048, b"\0") + data[2048:])
    buf[257:265] = b"ustar\0" + b"00"
    for start in range(0, 2048, 512):
        block = buf[start:start + 512]
        block[148:156] = b" " * 8
        buf[start + 148:start + 156] = b"%6o \0" % sum(block)
    return bytes(buf)


def TestOneInput(data):
    if data[:1] == b"T":
        data = _fix_headers(data[1:])
    reads = []

    def read_at(offset, length):
        if offset < 0 or length < 0:
            raise AssertionError(f"bad read ({offset}, {length})")
        reads.append(length)
        return data[offset:offset + length]

    try:
        found = tar.detect(read_at, len(data), "fuzz")
    except FormatError as e:
        assert str(e).startswith("fuzz: "), e
        found = None
    if found is not None:
        offset, size = found
        assert offset in (512, 1536), found
        assert size >= 0 and offset + size <= len(data), found
    assert len(reads) <= 8 and sum(reads) <= 4 * 512, reads


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
