#!/usr/bin/env python3
"""Fuzz tcmu_obd.remote.trace.decode and parse_file_list with arbitrary bytes.

Run: python fuzz/fuzz_trace.py -max_total_time=20   (or -runs=N, or a corpus dir)
The first input byte picks the target:
  0 - decode the rest as is;
  1 - decode after repairing magic, data_size and checksum (so the fuzzer
      reaches the record checks without a corpus);
  2 - parse_file_list of the rest.
Only FormatError may escape the targets; anything else is a finding.  Decoded
records must re-encode to the same bytes up to record padding.
"""

import os
import struct
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    from tcmu_obd.remote import trace
    from tcmu_obd.core import crc32c
    from tcmu_obd.errors import FormatError


def _repair(body):
    body = body[:len(body) - len(body) % 24]
    return struct.pack("<I4xQI4x", trace.MAGIC, len(body), crc32c(body, 0)) + body


def _check_decode(data):
    try:
        records = trace.decode(data, "fuzz")
    except FormatError as e:
        assert str(e).startswith("fuzz: "), e
        return
    assert len(data) == 24 + 24 * len(records)
    again = trace.encode(records)
    # the same bytes except the header padding, record padding and checksum
    for i, rec in enumerate(records):
        a, b = data[24 + 24 * i:48 + 24 * i], again[24 + 24 * i:48 + 24 * i]
        assert a[0] == b[0] and a[4:] == b[4:], (i, rec)
    assert again[:16] == bytes(data[:4]) + bytes(4) + bytes(data[8:16])


def _check_list(data):
    try:
        items = trace.parse_file_list(data, "fuzz")
    except FormatError as e:
        assert str(e).startswith("fuzz: size = "), e
        assert len(data) > trace.MAX_LIST_SIZE
        return
    for path, recursive in items:
        assert path.startswith("/") and isinstance(recursive, bool), (path, recursive)
        assert path == "/" or not path.endswith(("/", "*")), path
        assert ".." not in path.split("/"), path


def TestOneInput(data):
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        _check_decode(rest)
    elif mode == 1:
        _check_decode(_repair(rest))
    else:
        _check_list(rest)


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
