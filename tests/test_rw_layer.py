"""Writable layers: on-disk bytes of a write, 4 MiB splitting, index replay
on reopen (newer wins), a torn last record, sparse rebuild, vsize updates,
sealing, and the stack rules for an upper over read-only layers."""
import os
import re
import struct
import tempfile
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_layer
from tcmu_obd.errors import UsageError
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer


def records_on_disk(index_path):
    raw = open(index_path, "rb").read()[4096:]
    out = []
    for k in range(0, len(raw) - len(raw) % 16, 16):
        w0, w1 = struct.unpack_from("<QQ", raw, k)
        out.append((w0 & (2**50 - 1), w0 >> 50, w1 & (2**55 - 1), (w1 >> 55) & 1, w1 >> 56))
    return out


def test_append_layer_bytes_and_split(tmp_path):
    d, i = tmp_path / "d", tmp_path / "i"
    up = RWLayer.create(d, i, 64 << 20)
    big = os.urandom(9 << 20)                       # 9 MiB: split into 4 + 4 + 1 MiB
    up.write(big, 512)
    up.discard(0, 512)
    up.fsync()
    up.close()
    assert records_on_disk(i) == [(1, 8192, 8, 0, 0), (8193, 8192, 8200, 0, 0),
                                  (16385, 2048, 16392, 0, 0), (0, 1, 18440, 1, 0)]
    raw = open(d, "rb").read()
    assert raw[4096:] == big
    assert struct.unpack_from("<I", raw, 28)[0] == 0x03
    assert struct.unpack_from("<I", open(i, "rb").read(), 28)[0] == 0x01


def test_reopen_replays_newer_wins(tmp_path):
    d, i = tmp_path / "d", tmp_path / "i"
    up = RWLayer.create(d, i, 1 << 20)
    up.write(b"a" * 8192, 0)
    up.write(b"b" * 1024, 2048)
    up.discard(4096, 512)
    up.close()
    up = RWLayer.open(d, i)
    assert up.index.records() == [(0, 4, 8, 0, 0), (4, 2, 24, 0, 0), (6, 2, 14, 0, 0),
                                  (8, 1, 26, 1, 0), (9, 7, 17, 0, 0)]
    with Image([], up) as image:
        assert image.read(0, 8192) == b"a" * 2048 + b"b" * 1024 + b"a" * 1024 + bytes(512) + b"a" * 3584


def test_torn_index_tail_is_ignored_and_overwritten(tmp_path):
    d, i = tmp_path / "d", tmp_path / "i"
    up = RWLayer.create(d, i, 1 << 20)
    up.write(b"x" * 512, 0)
    up.close()
    with open(i, "ab") as f:
        f.write(b"\x01\x02\x03")                      # a crash in the middle of a record
    up = RWLayer.open(d, i)
    up.write(b"y" * 512, 512)
    up.close()
    up = RWLayer.open(d, i)
    with Image([], up) as image:
        assert image.read(0, 1024) == b"x" * 512 + b"y" * 512


def test_sparse_reopen_rebuilds_from_allocation(tmp_path):
    d, i = tmp_path / "d", tmp_path / "i"
    up = RWLayer.create(d, i, 1 << 20, sparse=True)
    up.write(b"s" * 8192, 16384)
    up.write(b"t" * 4096, 65536)
    up.discard(65536, 4096)
    up.close()
    up = RWLayer.open(d, i)
    assert up.sparse
    assert up.index.records() == [(32, 16, 40, 0, 0)]       # the punched block is a hole again
    up.close()


def test_upper_inherits_vsize_and_shadows(tmp_path):
    low = make_layer(str(tmp_path), "low", [(0, b"L" * 16384)], vsize=3 << 20)
    d, i = tmp_path / "d", tmp_path / "i"
    up = RWLayer.create(d, i, 0)
    image = Image([open_layer(low)], up)
    assert image.virtual_size == 3 << 20
    assert struct.unpack_from("<Q", open(i, "rb").read(), 48)[0] == 3 << 20   # persisted in both headers
    assert struct.unpack_from("<Q", open(d, "rb").read(), 48)[0] == 3 << 20
    image.write(b"U" * 512, 512)
    image.discard(1024, 1024)
    assert image.read(0, 4096) == b"L" * 512 + b"U" * 512 + bytes(1024) + b"L" * 2048
    image.close()


def test_update_vsize_and_write_past_end(tmp_path):
    d, i = tmp_path / "d", tmp_path / "i"
    up = RWLayer.create(d, i, 1 << 20)
    up.write(b"z" * 512, (1 << 20) + 512)             # raises the in-memory size only
    assert up.vsize == (1 << 20) + 1024
    up.close()
    up = RWLayer.open(d, i)
    assert up.vsize == 1 << 20
    up.update_vsize(8 << 20)
    up.close()
    assert RWLayer.open(d, i).vsize == 8 << 20


def test_unaligned_io_is_refused(tmp_path):
    up = RWLayer.create(tmp_path / "d", tmp_path / "i", 1 << 20)
    with pytest.raises(UsageError):
        up.write(b"x" * 100, 0)
    with pytest.raises(UsageError):
        up.discard(1, 512)
    with Image([], up) as image:
        with pytest.raises(UsageError):
            image.read(1, 512)
        assert image.pread(1, 3) == bytes(3)           # the unaligned API rounds for you


def test_read_only_image_refuses_writes(tmp_path):
    low = make_layer(str(tmp_path), "low", [(0, b"L" * 512)])
    with Image([open_layer(low)]) as image:
        with pytest.raises(UsageError):
            image.write(b"x" * 512, 0)


def test_concurrent_writes_and_reads_stay_consistent(tmp_path):
    """Reads run without the GIL while writers insert records; every sector
    read must be one of the values ever written there."""
    up = RWLayer.create(tmp_path / "d", tmp_path / "i", 4 << 20)
    image = Image([], up)
    stop = threading.Event()
    errors = []

    def writer(seed):
        k = 0
        while not stop.is_set() and k < 3000:
            sec = (k * 7919 + seed * 104729) % 8192
            image.write(bytes([seed]) * 512, sec * 512)
            k += 1

    def reader():
        while not stop.is_set():
            data = image.read(0, 4 << 20)
            for off in range(0, len(data), 512):
                if data[off:off + 512] not in (bytes(512), b"\x01" * 512, b"\x02" * 512):
                    errors.append(off)
                    return

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join()
    stop.set()
    threads[2].join()
    assert not errors
    image.close()


# ---------------------------------------------------------------- sealing twice
SEAL_OPS = st.lists(st.tuples(st.sampled_from(["w", "d"]), st.integers(0, 63), st.integers(1, 16),
                              st.integers(0, 255)), max_size=12)


def apply_ops(up, ops, model):
    for kind, sec, n, byte in ops:
        n = min(n, 64 - sec)
        if kind == "w":
            up.write(bytes([byte]) * (n * 512), sec * 512)
            model[sec * 512:(sec + n) * 512] = bytes([byte]) * (n * 512)
        else:
            up.discard(sec * 512, n * 512)
            model[sec * 512:(sec + n) * 512] = bytes(n * 512)


@settings(max_examples=40, deadline=None)
@given(SEAL_OPS, st.booleans())
def test_rw_layer_seal_twice_is_refused_and_changes_nothing(ops, reopen):
    """A second seal, on the same object or on the sealed files reopened,
    fails naming the data file and leaves its bytes as the first seal left
    them (still a layer that reads back the model)."""
    with tempfile.TemporaryDirectory() as tmp:
        d, i = os.path.join(tmp, "d"), os.path.join(tmp, "i")
        model = bytearray(64 * 512)
        up = RWLayer.create(d, i, len(model))
        apply_ops(up, ops, model)
        up.seal()
        sealed = open(d, "rb").read()
        if reopen:
            up.close()
            up = RWLayer.open(d, i)
        with pytest.raises(UsageError, match=re.escape(d) + ".*already sealed"):
            up.seal()
        up.close()
        assert open(d, "rb").read() == sealed
        with Image([open_layer(d)]) as image:
            assert image.read(0, len(model)) == model


def test_rw_layer_seal_after_more_writes_seals_them(tmp_path):
    """Reopened and changed after a seal, the files are not 'already sealed':
    sealing again seals the new content."""
    d, i = str(tmp_path / "d"), str(tmp_path / "i")
    model = bytearray(64 * 512)
    up = RWLayer.create(d, i, len(model))
    apply_ops(up, [("w", 0, 8, 1)], model)
    up.seal()
    up.close()
    up = RWLayer.open(d, i)
    apply_ops(up, [("d", 2, 2, 0), ("w", 20, 3, 7)], model)
    up.seal()
    up.close()
    with Image([open_layer(d)]) as image:
        assert image.read(0, len(model)) == model


def test_rw_layer_seal_of_data_ending_in_a_trailer(tmp_path):
    """User data that happens to end with a sealed layer's own last bytes
    (an image of a layer file, say) is data, not a seal."""
    other = tmp_path / "o"
    up = RWLayer.create(other, tmp_path / "oi", 64 * 512)
    up.write(b"o" * 4096, 0)
    up.seal()
    up.close()
    tail = open(other, "rb").read()
    assert len(tail) % 512 == 0
    d, i = str(tmp_path / "d"), str(tmp_path / "i")
    up = RWLayer.create(d, i, len(tail) + 4096)
    up.write(tail, 0)
    up.seal()
    up.close()
    with Image([open_layer(d)]) as image:
        assert image.read(0, len(tail)) == tail
