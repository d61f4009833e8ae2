#!/usr/bin/env python3
"""Fuzz the ZFile reader: tcmu_obd.format.zfile.open_backing and reads of the
decompressed view (the core ZFileBacking: jump table, CRCs, LZ4/ZSTD decode).

Run: python fuzz/fuzz_zfile.py -max_total_time=20   (or -runs=N, or a corpus dir)

The file is a memfd; it is opened at a byte offset `base` (as a tar-wrapped
ZFile is) and, on success, read whole, block by block and at input-derived
ranges.  Only tcmu_obd.errors.FormatError (CorruptDataError included) and
ReadError may escape, with the path first in the message; anything else is
a finding.  Successful reads must agree with each other (a whole read equals
the concatenation of per-block reads), and an unmutated rebuild must read
back its original bytes.

Input modes (the first byte modulo 8 is the marker; the second is `sel`):
  0-1  raw: the bytes are the file;
  2-4  splice + fix: splice the rest into a real small valid ZFile (sel % 5
       picks it), then recompute every stored block CRC, both index_crc
       fields and the header digest, so the fuzzer gets past the checksums
       and into the jump-table checks and the decoders;
  5    splice only (checksums left as the splice made them);
  6-7  rebuild: parse the seed into header fields and block payloads, let
       the ops replace/insert/drop payloads or set header fields, then write
       a fully consistent file (lengths, CRCs, digests) around them.
sel bits 5..7 put (sel >> 5) * 512 bytes of junk before the ZFile (base).
Bit 3 of the first byte reads the blocks through a mapping (map_blocks, as
open_layer does for local files) instead of pread.
"""

import io
import os
import random
import struct
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _splice import splice  # noqa: E402  (fuzz/ is the script's directory)

with atheris.instrument_imports():
    from tcmu_obd import core
    from tcmu_obd.format import zfile
    from tcmu_obd.errors import FormatError, ReadError

PATH = "fuzz-zfile"
BAD_INPUT = (FormatError, ReadError)
SALT = 100007
FULL_READ_MAX = 256 << 10        # read the whole view when it is at most this big
VERIFY_ALL_MAX = 1 << 20
FD_CHECK_EVERY = 2000


def _payload(rnd, n):
    """Mixed data: random, zeros and text, so blocks compress differently."""
    parts = [bytes(rnd.getrandbits(8) for _ in range(n // 3)), bytes(n // 3),
             (b"overlaybd zfile " * (n // 16 + 1))[:n - 2 * (n // 3)]]
    return b"".join(parts)


def _build(payload, algo, bs, verify, overwrite):
    out = io.BytesIO()
    w = zfile.ZFileWriter(out, algo, bs, verify, overwrite)
    w.write(payload)
    w.close()
    return out.getvalue()


def _seeds():
    rnd = random.Random(11)
    small = _payload(rnd, 10000)
    incompressible = bytes(rnd.getrandbits(8) for _ in range(65536 + 700))
    specs = [
        (small, zfile.ALGO_LZ4, 4096, True, False),
        (small, zfile.ALGO_ZSTD, 4096, True, True),
        (incompressible, zfile.ALGO_LZ4, 65536, True, True),   # stored block > block_size
        (small, zfile.ALGO_LZ4, 8192, False, False),
        (_payload(rnd, 40000), zfile.ALGO_ZSTD, 16384, True, False),
    ]
    return [(spec[0], _build(*spec)) for spec in specs]


SEEDS = _seeds()


# --------------------------------------------------------------- parsing helpers
def _info_of(blob):
    """(ZHeader in use, where) of a seed or mutated blob, or None."""
    try:
        info, _ = zfile.read_info(lambda o, n: blob[o:o + n], len(blob), PATH)
        return info
    except FormatError:
        pass
    # fall back to whatever struct the bytes hold, without the checks
    if len(blob) < 1024:
        return None
    hdr = zfile.ZHeader.unpack(blob[:512], PATH, "header") if blob[:24] == zfile.MAGIC0 + zfile.MAGIC1 else None
    if hdr is not None and hdr.flags & zfile.F_OVERWRITE:
        return hdr
    raw = blob[-512:]
    if raw[:24] == zfile.MAGIC0 + zfile.MAGIC1:
        return zfile.ZHeader.unpack(raw, PATH, "trailer")
    return hdr


def _regions(blob):
    info = _info_of(blob)
    regions = [(0, 512), (len(blob) - 512, 512)]
    if info is not None:
        regions.append((info.index_offset, info.index_size * 4))
        regions.append((512, info.index_offset - 512))
    return regions


def _put_crc(buf, at, value):
    if 0 <= at and at + 4 <= len(buf):
        buf[at:at + 4] = struct.pack("<I", value)


def fix_checksums(buf):
    """Recompute block CRCs (walking the jump table as far as it stays in the
    file), both index_crc fields and both digests.  Works on any bytes."""
    if len(buf) < 1024:
        return bytes(buf)
    info = _info_of(bytes(buf))
    if info is not None:
        ioff, n = info.index_offset, min(info.index_size, 1 << 20)
        if ioff + 4 * n <= len(buf):
            table = bytes(buf[ioff:ioff + 4 * n])
            if info.verify:
                pos = 512 + info.dict_size
                for (length,) in struct.iter_unpack("<I", table):
                    if length < 4 or pos + length > len(buf):
                        break
                    _put_crc(buf, pos + length - 4, core.crc32c(bytes(buf[pos:pos + length - 4]), SALT))
                    pos += length
            crc = core.crc32c(table)
            _put_crc(buf, 64, crc)
            _put_crc(buf, len(buf) - 512 + 64, crc)
    for start in (0, len(buf) - 512):
        block = bytearray(buf[start:start + 512])
        block[28:32] = bytes(4)
        _put_crc(buf, start + 28, core.crc32c(bytes(block)))
    return bytes(buf)


# --------------------------------------------------------------- rebuild mode
_FIELDS = [("block_size", "<I"), ("algo", "<B"), ("original_file_size", "<Q"),
           ("verify", "<B"), ("index_size", "<Q"), ("dict_size", "<I"), ("flags", "<Q")]


def rebuild(seed_blob, sel, ops):
    """A consistent ZFile from the seed's blocks after the ops; returns
    (blob, unchanged) where unchanged means no op applied."""
    info = _info_of(seed_blob)
    table = seed_blob[info.index_offset:info.index_offset + 4 * info.index_size]
    lengths = [x for (x,) in struct.iter_unpack("<I", table)]
    payloads, pos = [], 512
    for length in lengths:
        stored = seed_blob[pos:pos + length]
        payloads.append(stored[:-4] if info.verify else stored)
        pos += length
    fields = {name: getattr(info, name) for name, _ in _FIELDS}
    fields["index_size"] = None
    fields["flags"] = None
    i, changed = 0, False
    while i + 2 <= len(ops):
        kind, arg = ops[i] % 5, ops[i + 1]
        i += 2
        changed = True
        if kind == 0 and payloads:            # replace a payload
            n = ops[i] if i < len(ops) else 0
            payloads[arg % len(payloads)] = bytes(ops[i + 1:i + 1 + n])
            i += 1 + n
        elif kind == 1:                       # set a header field
            name, fmt = _FIELDS[arg % len(_FIELDS)]
            size = struct.calcsize(fmt)
            raw = bytes(ops[i:i + size]).ljust(size, b"\0")
            i += size
            fields[name] = struct.unpack(fmt, raw)[0]
        elif kind == 2 and payloads:          # drop a block
            del payloads[arg % len(payloads)]
        elif kind == 3 and payloads:          # duplicate a block
            k = arg % len(payloads)
            payloads.insert(k, payloads[k])
        elif kind == 4:                       # append raw bytes as a block
            n = ops[i] if i < len(ops) else 0
            payloads.append(bytes(ops[i + 1:i + 1 + n]))
            i += 1 + n
    verify = fields["verify"]
    body = bytearray()
    lens = []
    for p in payloads:
        stored = p + (struct.pack("<I", core.crc32c(p, SALT)) if verify else b"")
        body += stored
        lens.append(len(stored))
    jt = struct.pack(f"<{len(lens)}I", *lens)
    hdr = zfile.ZHeader(0, 512 + len(body), len(lens) if fields["index_size"] is None else fields["index_size"],
                        fields["original_file_size"], core.crc32c(jt), fields["block_size"], fields["algo"],
                        0, 0, fields["dict_size"], verify)
    overwrite = bool(sel & 1)
    flags = fields["flags"]
    hdr.flags = (flags | zfile.F_HEADER) if flags is not None else \
        (zfile.F_HEADER | zfile.F_DATA | zfile.F_DIGEST | (zfile.F_OVERWRITE if overwrite else 0))
    head = hdr.pack()
    hdr.flags = (flags & ~zfile.F_HEADER) if flags is not None else (zfile.F_DATA | zfile.F_SEALED | zfile.F_DIGEST)
    return head + bytes(body) + jt + hdr.pack(), not changed


# --------------------------------------------------------------- the target
class _MemFile:
    def __init__(self, name):
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)

    def set(self, data):
        os.ftruncate(self.fd, 0)
        view = memoryview(data)
        off = 0
        while off < len(view):
            off += os.pwrite(self.fd, view[off:], off)


FILE = _MemFile("fuzz-zfile")
MODES = ["raw", "raw", "fix", "fix", "fix", "splice", "rebuild", "rebuild"]
_runs = 0
_fd_baseline = None


def _read_checks(backing, info, data, expect):
    size = backing.size
    assert size == info.original_file_size
    bs = info.block_size
    if size <= FULL_READ_MAX:
        whole = backing.pread(0, size)
        assert len(whole) == size
        if expect is not None:
            assert whole == expect, "an unmutated ZFile read back wrong bytes"
        pieces = b"".join(backing.pread(off, bs) for off in range(0, size, bs))
        assert pieces == whole, "per-block reads disagree with the whole read"
        if size > 1:
            mid = size // 2
            assert backing.pread(mid - 1, 2) == whole[mid - 1:mid + 1]
    tail = data[-8:].ljust(8, b"\0")
    a, b = struct.unpack("<II", tail)
    off = a % (size + 1024)
    got = backing.pread(off, b % (128 << 10))
    assert len(got) == max(0, min(b % (128 << 10), size - off))
    if info.verify and size <= VERIFY_ALL_MAX:
        backing.verify_all()


def TestOneInput(data):
    global _runs, _fd_baseline
    mode = MODES[data[0] % len(MODES)] if data else "raw"
    sel, ops = data[1] if len(data) > 1 else 0, data[2:]
    expect = None
    if mode == "raw":
        blob = data
    else:
        payload, seed = SEEDS[sel % len(SEEDS)]
        if mode == "rebuild":
            blob, unchanged = rebuild(seed, sel >> 3, ops)
            expect = payload if unchanged else None
        else:
            blob = splice(seed, _regions(seed), ops)
            blob = fix_checksums(blob) if mode == "fix" else bytes(blob)
    base = (sel >> 5) * 512 if mode != "raw" else 0
    FILE.set(b"\xaa" * base + blob)
    try:
        head = os.pread(FILE.fd, 512, base)
        is_z = zfile.is_zfile(head, PATH)
        backing, info = zfile.open_backing(FILE.fd, base, len(blob), PATH)
        if data and data[0] & 8:
            backing.map_blocks()        # decode from a mapping, as open_layer does for local files
        if expect is not None:
            assert is_z
        _read_checks(backing, info, data, expect)
    except BAD_INPUT as e:
        assert expect is None, f"an unmutated ZFile failed: {e}"
        assert str(e).startswith(PATH + ": "), f"error does not name the file: {e}"
    _runs += 1
    if _runs % FD_CHECK_EVERY == 0:
        n = len(os.listdir("/proc/self/fd"))
        if _fd_baseline is None:
            _fd_baseline = n
        assert n <= _fd_baseline + 2, f"descriptor leak: {n} open, {_fd_baseline} after the first check"


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
