"""Fuzz tcmu_obd.tar.detect with arbitrary blobs.

Run: python fuzz/fuzz_tar.py -max_total_time=20   (or -runs=N, or a corpus dir)
detect may return None or a payload range inside the blob, or raise
FormatError; anything else escapes and is reported as a finding.
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    from tcmu_obd import tar
    from tcmu_obd.errors import FormatError


def TestOneInput(data):
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
    assert len(reads) <= 4 and sum(reads) <= 4 * 512, reads


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
