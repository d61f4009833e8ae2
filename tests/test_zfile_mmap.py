"""Local ZFile layers read through a mapping (native/mapguard.c): the same
bytes as the pread path, and a file that shrinks under the mapping gives a
clear ReadError (the SIGBUS is caught and the read redone with pread), never
a dead process.  A SIGBUS that is not ours still kills as before: outside a
guarded decode, and inside one when the fault is not in the armed mapping
(the destination buffer is a mapping that faults).  Nothing allocates while
a decode is armed (per-thread codec contexts are made before)."""
import os
import random
import signal
import subprocess
import sys
import threading

import pytest

from tcmu_obd.core import _lsmt
from tcmu_obd.format import zfile
from tcmu_obd.errors import ReadError

pytestmark = pytest.mark.skipif(os.environ.get("TCMU_OBD_PURE") == "1",
                                reason="the pure-Python twin does not map files")

BS = 4096
SIZE = 2 << 20


def data_of(seed=7):
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < SIZE:                   # half random, half repeats: compressible blocks
        piece = rng.randbytes(256)
        out += piece + piece[::-1] * rng.randrange(0, 3)
    return bytes(out[:SIZE])


def write(path, data, algo, verify=True):
    with open(path, "wb") as f:
        w = zfile.ZFileWriter(f, algo, BS, verify=verify)
        w.write(data)
        w.close()


def open_pair(path):
    """(mapped backing, pread backing) over the same file."""
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    mapped, _ = zfile.open_backing(fd, 0, size, path)
    plain, _ = zfile.open_backing(fd, 0, size, path)
    assert mapped.map_blocks() and mapped.mapped and not plain.mapped
    return fd, mapped, plain


@pytest.mark.parametrize("algo", [zfile.ALGO_LZ4, zfile.ALGO_ZSTD])
def test_zfile_mmap_reads_equal_pread_and_data(tmp_path, algo):
    data = data_of()
    path = str(tmp_path / "z")
    write(path, data, algo)
    fd, mapped, plain = open_pair(path)
    try:
        rng = random.Random(1)
        for _ in range(300):
            off = rng.randrange(SIZE)
            n = rng.choice([1, 511, BS, 3 * BS + 17, 70000])
            want = data[off:off + n]
            assert mapped.pread(off, n) == want
            assert plain.pread(off, n) == want
        mapped.verify_all()
    finally:
        os.close(fd)


def test_zfile_mmap_truncated_file_is_a_read_error(tmp_path):
    data = data_of()
    path = str(tmp_path / "z")
    write(path, data, zfile.ALGO_LZ4)
    fd, mapped, _ = open_pair(path)
    try:
        assert mapped.pread(0, BS) == data[:BS]
        recovered = _lsmt.mapguard_counters()["recovered"]
        first, _ = mapped.block_extent(0)
        os.truncate(path, first + 8192)      # the blocks after the first two pages are gone
        errors = []

        def reader(k):
            for i in range(40):
                blk = 100 + (k * 40 + i) % (SIZE // BS - 100)
                try:
                    mapped.pread(blk * BS, BS)
                    errors.append(f"block {blk}: no error")
                except ReadError as e:
                    errors.append(str(e))
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 160
        assert all("truncated?" in e and path in e for e in errors), errors[:3]
        # the mapped decodes faulted and the guard caught them (not a pread-only path)
        assert _lsmt.mapguard_counters()["recovered"] >= recovered + 160
        assert mapped.pread(0, 100) == data[:100]        # what is still there reads fine
    finally:
        os.close(fd)


def test_zfile_mmap_foreign_sigbus_still_kills(tmp_path):
    """Our handler passes a SIGBUS outside a guarded read on: the default action."""
    path = str(tmp_path / "z")
    write(path, data_of(), zfile.ALGO_LZ4)
    victim = str(tmp_path / "victim")
    with open(victim, "wb") as f:
        f.write(b"x" * 8192)
    code = f"""
import mmap, os
from tcmu_obd.format import zfile
fd = os.open({path!r}, os.O_RDONLY)
b, _ = zfile.open_backing(fd, 0, os.fstat(fd).st_size, {path!r})
assert b.map_blocks()
f = open({victim!r}, "r+b")
m = mmap.mmap(f.fileno(), 8192)
f.truncate(0)
print(m[4096])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGBUS, (p.returncode, p.stderr.decode()[-500:])


FAULTING_DESTINATION = """
import mmap, os, sys
from tcmu_obd.core import _lsmt
from tcmu_obd.format import zfile
path, victim, how = sys.argv[1:]
fd = os.open(path, os.O_RDONLY)
b, _ = zfile.open_backing(fd, 0, os.fstat(fd).st_size, path)
assert b.map_blocks()
f = open(victim, "r+b")
dst = mmap.mmap(f.fileno(), 2 * {BS})
f.truncate(0)                          # writing dst now raises SIGBUS
if how == "guarded":                   # straight into the guarded decode, no pread fallback
    print("swallowed: error code", _lsmt._decode_mapped_into(b, 3, dst), flush=True)
else:                                  # the read path a device uses
    stack = _lsmt.Stack([b], _lsmt.Index.from_records([(0, 2 * {BS} // 512, 8, 0, 0)]))
    stack.read_into(dst, 0)
    print("swallowed: read returned", flush=True)
""".replace("{BS}", str(BS))


@pytest.mark.parametrize("how", ["guarded", "stack"])
def test_zfile_mmap_fault_outside_the_armed_mapping_kills(tmp_path, how):
    """A SIGBUS while a decode is armed, at an address outside the mapping it
    reads (here: the destination is a mapping of a truncated file), is not
    the guard's to recover: the process dies of it, as without the guard."""
    path = str(tmp_path / "z")
    write(path, data_of(), zfile.ALGO_LZ4)
    victim = str(tmp_path / "victim")
    with open(victim, "wb") as f:
        f.write(b"x" * 2 * BS)
    p = subprocess.run([sys.executable, "-c", FAULTING_DESTINATION, path, victim, how],
                       capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGBUS, (p.returncode, p.stdout.decode(), p.stderr.decode()[-500:])
    assert b"swallowed" not in p.stdout


@pytest.mark.parametrize("algo", [zfile.ALGO_ZSTD, zfile.ALGO_LZ4])
def test_zfile_mmap_guarded_decode_never_allocates(tmp_path, algo):
    """A thread whose first decode is a mapped one: its zstd context is made
    before the guard is armed (an allocation inside would be refused and
    counted: a jump out of malloc would break the heap)."""
    data = data_of()
    path = str(tmp_path / "z")
    write(path, data, algo)
    fd, mapped, _ = open_pair(path)
    try:
        before = _lsmt.mapguard_counters()["armed_allocs"]
        got = []
        t = threading.Thread(target=lambda: got.append(mapped.pread(5 * BS, 4 * BS)))
        t.start()
        t.join()
        assert got == [data[5 * BS:9 * BS]]
        assert _lsmt.mapguard_counters()["armed_allocs"] == before
    finally:
        os.close(fd)


def test_zfile_mmap_refused_without_crc_or_when_short(tmp_path):
    """Past the end of a file, the rest of its last page reads as zeros through a
    mapping: only files holding every block, with CRCs to catch such zeros, are mapped."""
    data = data_of()
    plain = str(tmp_path / "nocrc")
    write(plain, data, zfile.ALGO_LZ4, verify=False)
    fd = os.open(plain, os.O_RDONLY)
    try:
        b, _ = zfile.open_backing(fd, 0, os.fstat(fd).st_size, plain)
        assert not b.map_blocks() and not b.mapped
        assert b.pread(12345, 5000) == data[12345:17345]
    finally:
        os.close(fd)
    short = str(tmp_path / "short")
    write(short, data, zfile.ALGO_LZ4)
    fd = os.open(short, os.O_RDONLY)
    try:
        b, _ = zfile.open_backing(fd, 0, os.fstat(fd).st_size, short)
        first, _ = b.block_extent(0)
        os.truncate(short, first + 100)            # the blocks are gone, the trailer was read
        assert not b.map_blocks()
        with pytest.raises(ReadError, match="truncated"):
            b.pread(0, BS)
    finally:
        os.close(fd)


def test_zfile_mmap_shrunk_inside_the_last_page_is_not_a_crc_error(tmp_path):
    """A file cut inside a page after it was mapped: the mapped bytes past the
    end are zeros, the block fails its CRC, and the read is redone with pread,
    which names the truncation."""
    data = data_of()
    path = str(tmp_path / "z")
    write(path, data, zfile.ALGO_LZ4)
    fd, mapped, _ = open_pair(path)
    try:
        start, length = mapped.block_extent(3)
        os.truncate(path, start + length // 2)     # block 3 ends mid-page now
        with pytest.raises(ReadError, match="truncated"):
            mapped.pread(3 * BS, BS)
    finally:
        os.close(fd)

