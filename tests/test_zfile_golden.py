"""Golden tests for ZFile output and overlaybd's raw CRC32C, laid out by hand
from the format (docs/formats.md, ZFile).  The LZ4 payloads come from the python lz4 package
(LZ4_compress_default, the same call overlaybd makes); every other byte,
and the CRC, is computed here independently of tcmu_obd."""
import io
import os
import struct

import lz4.block
import pytest

from tcmu_obd import core
from tcmu_obd.format import zfile

MAGIC = bytes.fromhex("5A46696C65000100") + b"tuji.yyf@Alibaba"


def raw_crc32c(data, crc=0):
    """Bitwise reflected Castagnoli update with no inversions."""
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


def ht(flags, ioff, isize, osize, icrc, bs, algo=1, verify=1):
    def build(digest):
        b = (MAGIC + struct.pack("<I", 96) + struct.pack("<I", digest) + struct.pack("<Q", flags)
             + struct.pack("<Q", ioff) + struct.pack("<Q", isize) + struct.pack("<Q", osize)
             + struct.pack("<I", icrc) + bytes(4) + struct.pack("<I", bs) + bytes([algo, 0, 0, 0])
             + bytes(4) + struct.pack("<I", 0) + bytes([verify]) + bytes(7))
        assert len(b) == 96
        return b + bytes(416)
    return build(raw_crc32c(build(0)))     # bit 4 (DIGEST) is set in every block written


def test_crc32c_is_overlaybds_raw_variant():
    assert raw_crc32c(b"123456789") == 0x58E3FA20
    assert core.crc32c(b"123456789") == 0x58E3FA20
    data = os.urandom(70000)
    assert core.crc32c(data, 100007) == raw_crc32c(data, 100007)
    assert core.crc32c(data[:13], 5) == raw_crc32c(data[:13], 5)


@pytest.mark.parametrize("overwrite", [False, True])
def test_zfile_golden_bytes(overwrite):
    bs = 4096
    data = (b"hello overlaybd " * 300)[:4096] + os.urandom(4096) + b"tail" * 100   # 3 blocks, last short
    out = io.BytesIO()
    w = zfile.ZFileWriter(out, zfile.ALGO_LZ4, bs, True, overwrite)
    w.write(data[:5000])
    w.write(data[5000:])
    size = w.close()
    blocks = []
    for i in range(0, len(data), bs):
        payload = lz4.block.compress(data[i:i + bs], mode="default", store_size=False)
        blocks.append(payload + struct.pack("<I", raw_crc32c(payload, 100007)))
    table = b"".join(struct.pack("<I", len(b)) for b in blocks)
    ioff = 512 + sum(len(b) for b in blocks)
    icrc = raw_crc32c(table)
    if overwrite:
        head = ht(0x1B, ioff, 3, len(data), icrc, bs)
    else:
        head = ht(0x13, 0, 0, 0, 0, bs)
    expect = head + b"".join(blocks) + table + ht(0x16, ioff, 3, len(data), icrc, bs)
    assert out.getvalue() == expect
    assert size == len(expect)


def test_zfile_threads_give_identical_output():
    data = os.urandom(3 << 20) + b"\0" * (1 << 20)
    outs = []
    for threads in (1, 2):
        out = io.BytesIO()
        w = zfile.ZFileWriter(out, zfile.ALGO_ZSTD, 16384, True, False, threads)
        for i in range(0, len(data), 100000):
            w.write(data[i:i + 100000])
        w.close()
        outs.append(out.getvalue())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("algo", [zfile.ALGO_LZ4, zfile.ALGO_ZSTD])
def test_incompressible_64k_blocks_read_back(tmp_path, algo):
    """overlaybd's reader fails when a 64 KiB LZ4 block compresses to more than
    64 KiB; ours must read it."""
    data = os.urandom(5 * 65536 + 1000)
    path = tmp_path / "z"
    with open(path, "wb") as f:
        w = zfile.ZFileWriter(f, algo, 65536, True, False)
        w.write(data)
        w.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        backing, info = zfile.open_backing(fd, 0, os.fstat(fd).st_size, str(path))
        assert backing.block_extent(0)[1] > 65536 + 4      # really larger than the block
        assert backing.pread(0, len(data)) == data
        assert backing.pread(65000, 70000) == data[65000:135000]
        backing.verify_all()
    finally:
        os.close(fd)
