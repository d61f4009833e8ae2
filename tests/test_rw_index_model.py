"""The writable layer's index (the B+tree in native/rwindex.c behind
_lsmt.Index once it takes writes) against simple models.

Properties: thousands of random inserts (overlapping, nested, covering,
zeroed) leave exactly the records the pure-Python twin holds, every sector
maps as a per-sector model says, lookups are the records clipped, the tree's
own structure check passes, and replaying the same log gives the same index.
A stateful machine drives an append-only RWLayer (real files) with writes,
discards, bursts of small writes and reopens (replay), comparing reads with
a bytearray and the index records with the bytes they point at.  Not about
read-only layers or stacking (test_image_model.py, test_reference_differential.py).
"""
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tcmu_obd.core import _lsmt as C
from tcmu_obd.core import reference as R
from tcmu_obd.errors import UsageError
from tcmu_obd.image.stack import Image
from tcmu_obd.image.rw import RWLayer, encode_record

SECTOR = 512


def random_ops(seed, count, span, maxlen, zero_ratio):
    rnd = random.Random(seed)
    ops = []
    for _ in range(count):
        kind = rnd.random()
        if kind < 0.05:                     # a long record over many small ones
            ln = rnd.randint(1, min(16383, span))
        else:
            ln = rnd.randint(1, maxlen)
        off = rnd.randrange(0, span)
        ops.append((off, ln, rnd.randrange(0, 1 << 40), int(rnd.random() < zero_ratio)))
    return ops


def expand(records):
    """sector -> (moffset of that sector, zeroed)"""
    out = {}
    for off, ln, mo, z, _tag in records:
        for k in range(ln):
            out[off + k] = (mo if z else mo + k, z)
    return out


def model_apply(model, ops):
    for off, ln, mo, z in ops:
        for k in range(ln):
            model[off + k] = (mo if z else mo + k, z)


def clip(records, off, ln):
    end = off + ln
    out = []
    for o, l_, mo, z, t in records:
        if o + l_ <= off or o >= end:
            continue
        s, e = max(o, off), min(o + l_, end)
        out.append((s, e - s, mo if z else mo + (s - o), z, t))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(seed=1, count=4500, span=20000, maxlen=8, zero_ratio=0.3)      # overlaps: splits and deletions
@example(seed=2, count=4500, span=1 << 30, maxlen=8, zero_ratio=0.0)    # few overlaps: a 3-level tree
@given(seed=st.integers(0, 2**32), count=st.integers(1, 4500), span=st.sampled_from([64, 1000, 20000, 1 << 30]),
       maxlen=st.sampled_from([1, 8, 64, 700]), zero_ratio=st.sampled_from([0.0, 0.3, 1.0]))
def test_inserts_match_the_twin_and_a_sector_model(seed, count, span, maxlen, zero_ratio):
    ops = random_ops(seed, count, span, maxlen, zero_ratio)
    a, b = C.Index(), R.Index()
    for k, (off, ln, mo, z) in enumerate(ops):
        a.insert(off, ln, mo, z, 0)
        b.insert(off, ln, mo, z, 0)
        if k % 500 == 0:
            assert a.check_tree() == 0
    assert a.is_tree and a.check_tree() == 0
    recs = a.records()
    assert recs == b.records()               # split exactly as the twin (and the old flat array) does
    assert len(a) == len(recs)
    assert a.check_sorted() == -1
    if span <= 20000:
        model = {}
        model_apply(model, ops)
        assert expand(recs) == model
    rnd = random.Random(seed ^ 0x5A5A)
    for _ in range(50):
        off = rnd.randrange(0, span + 100)
        ln = rnd.choice([1, 7, 64, 5000, 2**64 - 1 - off])
        got = a.lookup(off, ln)
        assert got == clip(recs, off, ln)
        assert got == b.lookup(off, ln)
    for x in (0, 1, span // 2, span, 2**64 - 1):
        assert a.find(x) == b.find(x)
    assert a.dump(7) == b.dump(7)
    assert a.data_sectors() == b.data_sectors()

    # replaying the same writes as an index log gives the same index
    log = b"".join(encode_record(off, ln, mo, z) for off, ln, mo, z in ops)
    c = C.Index()
    c.replay(log)
    assert c.check_tree() == 0 and c.records() == recs


def test_insert_into_a_flat_index_turns_it_into_a_tree():
    """from_records/from_raw give flat arrays; a write moves them into the
    tree, keeping every record and the newer-wins rule."""
    recs = [(i * 10, 5, i * 100, i % 2, 0) for i in range(1000)]
    for M in (C, R):
        idx = M.Index.from_records(recs)
        assert not idx.is_tree
        idx.insert(12, 20, 7)               # cuts [12, 15), covers 20..24, cuts into 30
        assert idx.is_tree and idx.check_tree() == 0
        got = idx.records()
        assert got[:4] == [(0, 5, 0, 0, 0), (10, 2, 100, 1, 0), (12, 20, 7, 0, 0), (32, 3, 300, 1, 0)]
        assert got[4:] == recs[4:]
        # zero-length records (from_records keeps them) do not move into the tree
        idx = M.Index.from_records([(0, 0, 0, 0, 0), (5, 3, 1, 0, 0), (8, 0, 0, 0, 0), (20, 2, 0, 0, 0)])
        idx.insert(6, 1, 99)
        assert idx.records() == [(5, 1, 1, 0, 0), (6, 1, 99, 0, 0), (7, 1, 3, 0, 0), (20, 2, 0, 0, 0)]


def test_merge_and_stack_read_a_tree_index():
    """merge() and Stack read an index in either shape the same way."""
    ops = random_ops(7, 3000, 5000, 16, 0.2)
    tree = C.Index()
    for off, ln, mo, z in ops:
        tree.insert(off, ln, mo % 4096, z, 0)
    flat = C.Index.from_records(tree.records())
    assert C.merge([tree]).records() == C.merge([flat]).records()
    with tempfile.TemporaryFile() as f:
        f.write(os.urandom((4096 + 16384) * SECTOR))     # moffset < 4096, length < 16384
        f.flush()
        files = [C.RawBacking(f.fileno(), 0, (4096 + 16384) * SECTOR, "f")]
        a, b = C.Stack(files, tree), C.Stack(files, flat)
        assert a.read(0, 5100 * SECTOR) == b.read(0, 5100 * SECTOR)
        up = C.Stack(files, None, tree)
        assert up.read(0, 5100 * SECTOR) == a.read(0, 5100 * SECTOR)
        assert up.lookup(0, 5100) == [r[:4] + (0,) for r in tree.lookup(0, 5100)]


def test_upper_cannot_be_the_lower(tmp_path):
    """One Index as both lower and upper would be read-locked twice by one
    read (a waiting writer would then deadlock it): refused."""
    with open(tmp_path / "f", "wb+") as f:
        f.write(bytes(4096))
        f.flush()
        for M in (C, R):
            idx = M.Index()
            with pytest.raises(UsageError, match="cannot also be the lower"):
                M.Stack([M.RawBacking(f.fileno(), 0, 4096, "f")], idx, idx)


def test_a_waiting_writer_keeps_new_readers_out():
    """The index lock prefers writers: with a reader inside and a writer
    queued, a new reader is refused, so a constant read load (TCMU workers
    reading without the GIL) cannot starve writes.  A reader-preferring
    rwlock (glibc's default) lets it in and the probe reports 0."""
    for idx in (C.Index(), C.Index.from_records([(0, 8, 0, 0, 0)])):
        idx.insert(100, 8, 8)
        assert idx.probe_writer_preference() == 1
    assert R.Index().probe_writer_preference() == 1


# ---------------------------------------------------------------- stateful: an RWLayer with reopens
SECTORS = 4096
VSIZE = SECTORS * SECTOR


def _fill(seed, n):
    return (bytes([(seed * 29 + k * 13) & 0xFF for k in range(509)]) * (n // 509 + 1))[:n]


class RWIndexMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="obd-rwidx-")
        self.paths = (os.path.join(self.dir, "data"), os.path.join(self.dir, "index"))
        RWLayer.create(*self.paths, VSIZE).close()
        self.layer = RWLayer.open(*self.paths)
        self.model = bytearray(VSIZE)

    def teardown(self):
        self.layer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(sec=st.integers(0, SECTORS - 1), n=st.integers(1, 400), seed=st.integers(0, 255))
    def write(self, sec, n, seed):
        n = min(n, SECTORS - sec)
        data = _fill(seed, n * SECTOR)
        self.layer.write(data, sec * SECTOR)
        self.model[sec * SECTOR:(sec + n) * SECTOR] = data

    @rule(sec=st.integers(0, SECTORS - 1), n=st.integers(1, 400))
    def discard(self, sec, n):
        n = min(n, SECTORS - sec)
        self.layer.discard(sec * SECTOR, n * SECTOR)
        self.model[sec * SECTOR:(sec + n) * SECTOR] = bytes(n * SECTOR)

    @rule(seed=st.integers(0, 2**32), count=st.integers(100, 2000), maxlen=st.sampled_from([1, 3, 16]))
    def burst(self, seed, count, maxlen):
        """Many small writes: thousands of records, a tree of several levels."""
        rnd = random.Random(seed)
        for _ in range(count):
            sec = rnd.randrange(SECTORS)
            n = min(rnd.randint(1, maxlen), SECTORS - sec)
            data = bytes([rnd.randrange(1, 256)]) * (n * SECTOR)
            self.layer.write(data, sec * SECTOR)
            self.model[sec * SECTOR:(sec + n) * SECTOR] = data

    @rule()
    def reopen(self):
        self.layer.close()
        self.layer = RWLayer.open(*self.paths)
        assert self.layer.index.is_tree
        # the twin replaying the same log holds the same records
        twin = R.Index()
        with open(self.paths[1], "rb") as f:
            f.seek(4096)
            twin.replay(f.read())
        assert twin.records() == self.layer.index.records()

    @rule(sec=st.integers(0, SECTORS - 1), n=st.integers(1, 2000))
    @precondition(lambda self: len(self.layer.index) > 0)
    def lookup(self, sec, n):
        recs = self.layer.index.records()
        assert self.layer.index.lookup(sec, n) == clip(recs, sec, n)

    @invariant()
    def index_matches_model(self):
        idx = self.layer.index
        assert idx.check_tree() == 0
        recs = idx.records()
        assert idx.check_sorted() == -1
        pos = 0
        fd = self.layer.data_fd
        for off, ln, mo, z, tag in recs:
            assert tag == 0
            assert self.model[pos * SECTOR:off * SECTOR] == bytes((off - pos) * SECTOR)   # a hole reads as zeros
            want = self.model[off * SECTOR:(off + ln) * SECTOR]
            got = bytes(ln * SECTOR) if z else os.pread(fd, ln * SECTOR, mo * SECTOR)
            assert got == want
            pos = off + ln
        assert self.model[pos * SECTOR:] == bytes(VSIZE - pos * SECTOR)

    @invariant()
    def reads_match_model(self):
        image = Image([], self.layer)
        assert image.read(0, VSIZE) == bytes(self.model)


TestRWIndex = RWIndexMachine.TestCase
TestRWIndex.settings = settings(max_examples=15, stateful_step_count=10, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])
