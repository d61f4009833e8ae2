#!/usr/bin/env python3
"""Fuzz the parsers of the small files a node keeps or is handed: a cache
blob's presence sidecar (tcmu_obd.remote.cache.load_presence), the global
overlaybd.json (configfile.read_json + service_config.from_dict) and a
device's config.v1.json (tcmu_obd.image.config.load).

Run: python fuzz/fuzz_config.py -max_total_time=20   (or -runs=N, or a corpus dir)
The first input byte picks the target:
  0 - the rest as a presence sidecar for a blob of a size and unit taken
      from the next bytes, as written;
  1 - the same with its CRC repaired (so the fuzzer reaches the field checks);
  2 - the rest as overlaybd.json;
  3 - the rest as config.v1.json.
Only ObdError subclasses may escape (FormatError for the sidecar, ConfigError
and UnsupportedError for the configs, each naming the file); anything else,
a warning class included, is a finding.  A sidecar that loads must give a
bitmap of exactly the blob's units.
"""

import os
import struct
import sys
import tempfile
import warnings

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    from tcmu_obd import service_config
    from tcmu_obd.core import crc32c
    from tcmu_obd.errors import ConfigError, FormatError, ObdError, UnsupportedError
    from tcmu_obd.image import config as image_config
    from tcmu_obd.remote import cache

_DIR = tempfile.mkdtemp(prefix="fuzz-config-")
_PATH = os.path.join(_DIR, "input")


class _Stat:
    st_dev = 0x801
    st_ino = 12345


_IDENT = bytes(range(16))


def _write(data):
    with open(_PATH, "wb") as f:
        f.write(data)


def _presence(data, repair):
    if len(data) < 4:
        return
    size = struct.unpack_from("<I", data)[0] % (1 << 24)
    unit = 4096 << (data[3] % 8)
    body = data[4:]
    if repair and len(body) >= 4:
        body = body[:-4] + struct.pack("<I", crc32c(body[:-4]))
    _write(body)
    try:
        bits = cache.load_presence(_PATH, size, unit, _Stat, _IDENT)
    except FormatError as e:
        assert str(e).startswith(_PATH), e
        return
    units = -(-size // unit)
    assert len(bits) == (units + 7) // 8, (len(bits), units)


def _config(data, loader, allowed):
    _write(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # unknown keys and notes are warnings, not findings
        try:
            loader(_PATH)
        except allowed as e:
            assert _PATH in str(e), e


def TestOneInput(data):
    if not data:
        return
    sel, rest = data[0] % 4, data[1:]
    if sel == 0:
        _presence(rest, False)
    elif sel == 1:
        _presence(rest, True)
    elif sel == 2:
        _config(rest, service_config.load, (ConfigError, UnsupportedError))
    else:
        _config(rest, image_config.load, (ConfigError, UnsupportedError))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
