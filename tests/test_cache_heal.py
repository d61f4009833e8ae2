"""Healing a cached remote layer from its source: any number of cached ZFile
blocks that fail their CRC are refetched (a budget per block, not per read),
a block bad at the source still fails naming the blob and the block, and a
cached jump table, LSMT index or header that fails its checks is evicted and
fetched again before the open gives up, once (a bad index at the source
fails the open with its error).  The source is the real layer file read with
pread; the cache file is damaged on disk."""
import os
import random

import pytest

from conftest import FileSource, make_layer
from tcmu_obd.format import lsmt, zfile
from tcmu_obd.remote.cache import FileCache
from tcmu_obd.errors import CorruptDataError, FormatError
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_cached_layer, open_layer

MiB = 1 << 20
VSIZE = 8 * MiB
UNIT = 262144
NAME = "sha256:" + "c" * 64


def _semi(rng, n):
    return bytes(rng.getrandbits(8) & 0x3F for _ in range(n))


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("heal"))
    rng = random.Random(8)
    writes = [(k * 512 * 1024, _semi(rng, 384 * 1024)) for k in range(VSIZE // (512 * 1024))]
    z = make_layer(tmp, "z", writes, vsize=VSIZE, use_zfile=True)
    r = make_layer(tmp, "r", writes[:6], vsize=VSIZE)
    with Image([open_layer(z)]) as img:
        want = img.read(0, VSIZE)
    return {"z": z, "raw": r, "want": want}


def _info(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return zfile.read_info(lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size, path)[0]
    finally:
        os.close(fd)


def _flip(path, offsets):
    fd = os.open(path, os.O_RDWR)
    try:
        for off in offsets:
            b = os.pread(fd, 1, off)
            os.pwrite(fd, bytes([b[0] ^ 0x5A]), off)
    finally:
        os.close(fd)


def _open(cache_dir, path, src=None):
    src = src or FileSource(path)
    cb = FileCache(cache_dir, 1, UNIT).open(NAME, src.size, src)
    return open_cached_layer(cb, "remote-layer"), src


def test_every_64k_corrupt_block_heals(tmp_path, layers):
    cdir = str(tmp_path / "c")
    layer, src = _open(cdir, layers["z"])
    layer.owner.ensure(0, src.size)                      # everything cached
    info = _info(layers["z"])
    # a flipped byte every 64 KiB of the stored blocks (16 KiB in: inside a block)
    bad = list(range(zfile.HT_SIZE + 16384, info.index_offset, 65536))
    assert len(bad) > 3 * src.size // UNIT // 4
    _flip(layer.owner.path, bad)
    n = len(src.reads)
    with Image([layer]) as img:
        assert img.read(0, VSIZE) == layers["want"]      # one read over every bad block
        assert img.read(0, VSIZE) == layers["want"]
    refetched = {off // UNIT for off, _ in src.reads[n:]}
    assert refetched == {off // UNIT for off in bad}     # each damaged unit fetched again


def test_block_bad_at_source_fails_naming_it(tmp_path, layers):
    bad_src = tmp_path / "bad-source"
    bad_src.write_bytes(open(layers["z"], "rb").read())
    with open_layer(layers["z"]) as local:
        blk = local.backing.nblocks // 2
        start, length = local.backing.block_extent(blk)
    _flip(bad_src, [start + length // 2])
    layer, src = _open(str(tmp_path / "c"), str(bad_src))
    with Image([layer]) as img:
        with pytest.raises(CorruptDataError) as e:
            img.read(0, VSIZE)
        assert e.value.field == f"zfile block {blk} crc" and "remote-layer" in str(e.value)
        unit = (start + length // 2) // UNIT
        fetches = [off for off, n in src.reads if off <= unit * UNIT < off + n]
        assert 2 <= len(fetches) <= 3                     # first fetch + at most two refetches
        assert img.read(0, blk * 4096 - 4096) == layers["want"][:blk * 4096 - 4096]   # the rest reads


def _close_cached(cdir, path):
    layer, _src = _open(cdir, path)
    layer.owner.ensure(0, layer.owner.size)
    layer.close()


def test_corrupt_cached_jump_table_is_refetched(tmp_path, layers):
    cdir = str(tmp_path / "c")
    _close_cached(cdir, layers["z"])
    info = _info(layers["z"])
    _flip(os.path.join(cdir, NAME), [info.index_offset + 4 * k for k in range(0, info.index_size, 7)])
    layer, src = _open(cdir, layers["z"])
    assert src.reads                                       # fetched again
    with Image([layer]) as img:
        assert img.read(0, VSIZE) == layers["want"]


@pytest.mark.parametrize("where", ["index", "trailer", "header"])
def test_corrupt_cached_lsmt_parts_are_refetched(tmp_path, layers, where):
    cdir = str(tmp_path / "c")
    _close_cached(cdir, layers["raw"])
    with open_layer(layers["raw"]) as local:
        trailer = local.trailer
        want = Image([open_layer(layers["raw"])]).read(0, VSIZE)
    path = os.path.join(cdir, NAME)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    if where == "index":        # every record the same: they overlap
        rec = os.pread(fd, 16, trailer.index_offset)
        os.pwrite(fd, rec * trailer.index_size, trailer.index_offset)
    elif where == "trailer":
        os.pwrite(fd, b"\0" * 64, size - lsmt.HT_SPACE)
    else:
        os.pwrite(fd, b"\xff" * 64, 0)
    os.close(fd)
    layer, src = _open(cdir, layers["raw"])
    assert src.reads
    with Image([layer]) as img:
        assert img.read(0, VSIZE) == want


def test_bad_jump_table_at_source_fails_the_open_once(tmp_path, layers):
    info = _info(layers["z"])
    bad_src = tmp_path / "bad-index"
    bad_src.write_bytes(open(layers["z"], "rb").read())
    _flip(bad_src, [info.index_offset + 8])
    cdir = str(tmp_path / "c")
    src = FileSource(bad_src)
    cb = FileCache(cdir, 1, UNIT).open(NAME, src.size, src)
    cb.ensure(0, src.size)              # all of it cached: the open evicts and refetches once
    n = len(src.reads)
    with pytest.raises(CorruptDataError) as e:
        open_cached_layer(cb, "remote-layer")
    assert e.value.field.endswith("index_crc") and "remote-layer" in str(e.value)
    assert 1 <= len(src.reads) - n <= 3                   # one refetch of head and tail, no loop
    assert cb.fd == -1                                     # the failed open closed the blob
    # nothing cached yet: the registry's bytes fail at once, with no second fetch
    src2 = FileSource(bad_src)
    cb2 = FileCache(str(tmp_path / "c2"), 1, UNIT).open(NAME, src2.size, src2)
    with pytest.raises(FormatError):
        open_cached_layer(cb2, "remote-layer")
    assert len(src2.reads) <= 2
