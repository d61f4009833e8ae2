"""Differential tests: the Cython core (tcmu_obd.core._lsmt) against its pure-Python
twin (tcmu_obd.core.reference), and both against small independent models.

Every test builds the same inputs for both modules and requires the same
answer, or the same exception class with the same fields (only the `value`
of an undecodable-block error is implementation-specific: it is the codec's
return code; and a ReadError for a short file must name the same file end,
not the same pread span, since _lsmt skips ZFile blocks it has cached).  Models: a dict sector -> (moffset, zeroed, tag) for indexes
and merges, and a bytearray of the expected device bytes for stack reads.
"""

import array
import os
import random
import re
import struct
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tcmu_obd.core import _lsmt as C
from tcmu_obd.core import reference as R
from tcmu_obd.errors import CorruptDataError, FormatError, ObdError, ReadError, UsageError

SECTOR = 512
INVALID = (1 << 50) - 1
MAX_LENGTH = (1 << 14) - 1
MAX_MOFFSET = (1 << 55) - 1
SPAN = re.compile(r" inside a read of \d+ bytes at byte \d+")

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- outcome comparison
def fields(e):
    """What must agree about an exception: class and fields (or message)."""
    if isinstance(e, FormatError):
        if isinstance(e, CorruptDataError) and e.field.startswith("zfile block") and not e.field.endswith("crc"):
            return (e.path, e.field, e.why)       # value: the codec's return code
        return (e.path, e.field, e.value, e.why)
    if isinstance(e, ReadError):
        # where a short file ends is fixed; which coalesced pread hit it is not
        # (_lsmt serves partial ZFile blocks from a cache and skips their bytes)
        return SPAN.sub(" inside a read", str(e))
    if isinstance(e, ObdError):
        return str(e)
    return None                                   # builtin errors: the class is enough


def outcome(fn, *args):
    try:
        res = fn(*args)
        if type(res).__module__ == C.__name__ or type(res).__module__.startswith(R.__name__ + "."):   # an object: compare its class name
            res = ("object", type(res).__name__)
        return ("ok", res)
    except (ObdError, TypeError, ValueError, OverflowError, IndexError, BufferError, MemoryError) as e:
        return ("err", type(e), fields(e))


def is_decode_error(out):
    return (out[0] == "err" and out[1] is CorruptDataError and out[2][1].startswith("zfile block")
            and not out[2][1].endswith("crc"))


def on_both_loose(fn):
    """Like on_both, but only the class and the field name must agree."""
    oc, orr = outcome(fn, C), outcome(fn, R)
    key = lambda o: o[:2] + ((o[2][1],) if o[0] == "err" and isinstance(o[2], tuple) else ())  # noqa: E731
    assert key(oc) == key(orr), f"\n_lsmt:     {oc!r}\nreference: {orr!r}"
    return oc


def on_both(fn, lenient=False):
    """fn(module) for both modules; asserts the outcomes agree and returns one.

    lenient: for damaged ZSTD blocks without a CRC.  The C core links the
    system libzstd (1.5.4), the zstandard wheel bundles 1.5.7, which rejects
    some corrupt frames the older one decodes; a decode error on one side
    then passes against any answer on the other."""
    oc, orr = outcome(fn, C), outcome(fn, R)
    if lenient and (is_decode_error(oc) or is_decode_error(orr)):
        return oc
    assert oc == orr, f"\n_lsmt:     {oc!r}\nreference: {orr!r}"
    return oc


def on_both_fails(fn, *classes, lenient=False):
    """on_both for bad input: both sides must raise the same error (one of
    `classes` when given).  Agreeing that bad input is fine fails the test."""
    out = on_both(fn, lenient)
    assert out[0] == "err", f"bad input accepted by both modules: {out!r}"
    if classes:
        assert issubclass(out[1], classes), out
    return out


# ---------------------------------------------------------------- models
def expand(records):
    """sector -> (moffset of that sector, zeroed, tag); zeroed records keep moffset."""
    m = {}
    for off, ln, mo, z, tag in records:
        for k in range(ln):
            m[off + k] = (mo if z else mo + k, z, tag)
    return m


def model_insert(model, off, ln, mo, z, tag=0):
    for k in range(ln):
        model[off + k] = (mo if z else mo + k, int(bool(z)), tag)


def model_merge(layer_models):
    out = {}
    for li, m in enumerate(layer_models):
        for s, (mo, z, _t) in m.items():
            out.setdefault(s, (mo, z, li))
    return out


def raw_record(off, ln, mo, z=0, tag=0):
    w0 = (off & INVALID) | (ln << 50)
    w1 = (mo & MAX_MOFFSET) | (z << 55) | (tag << 56)
    return struct.pack("<QQ", w0 & (2**64 - 1), w1 & (2**64 - 1))


# ---------------------------------------------------------------- strategies
def rec_ops(max_off=200, max_len=40, max_moff=1000, n=30):
    return st.lists(st.tuples(st.integers(0, max_off), st.integers(1, max_len),
                              st.integers(0, max_moff), st.booleans()), max_size=n)


# an insert argument that is sometimes out of range (UsageError / OverflowError)
wild_u64 = st.one_of(st.integers(0, 300), st.sampled_from([INVALID - 5, INVALID - 1, INVALID, 2**64 - 1, 2**64, -1]))
wild_len = st.one_of(st.integers(0, 50), st.sampled_from([MAX_LENGTH, MAX_LENGTH + 1, 2**32 - 1, 2**32]))
wild_moff = st.one_of(st.integers(0, 1000), st.sampled_from([MAX_MOFFSET, MAX_MOFFSET + 1, 2**64 - 1]))


def build_index(M, ops, tag=0):
    idx = M.Index()
    for off, ln, mo, z in ops:
        idx.insert(off, ln, mo, z, tag)
    return idx


# ---------------------------------------------------------------- crc32c / compression
def test_crc32c_vectors():
    for M in (C, R):
        assert M.crc32c(b"123456789") == 0x58E3FA20
        assert M.crc32c(b"") == 0 and M.crc32c(b"", 7) == 7
        assert M.SALT == 100007
    assert R.crc32c_table(0, b"123456789") == 0x58E3FA20


@FAST
@given(st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_crc32c_agrees(data, seed):
    assert C.crc32c(data, seed) == R.crc32c(data, seed) == R.crc32c_table(seed, data)
    assert C.crc32c(bytearray(data), seed) == R.crc32c(memoryview(data), seed)


def test_crc32c_argument_errors():
    for bad in ((b"x", -1), (b"x", 2**32), ("str",), (memoryview(b"abcd")[::2],)):
        on_both_fails(lambda M: M.crc32c(*bad))


def plain_data(seed, n):
    """Partly compressible bytes: random runs, repeats and zeros."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        kind = rng.randrange(3)
        k = rng.randrange(1, 700)
        out += rng.randbytes(k) if kind == 0 else (bytes(k) if kind == 1 else bytes([rng.randrange(256)]) * k)
    return bytes(out[:n])


@SLOW
@given(st.integers(1, 2), st.sampled_from([512, 1024, 4096, 65536]), st.booleans(),
       st.integers(0, 2**32), st.integers(0, 20000))
def test_compress_blocks_round_trip_across_implementations(algo, bs, verify, seed, n):
    data = plain_data(seed, n)
    outs = {M: M.compress_blocks(algo, data, bs, verify) for M in (C, R)}
    for M, (stored, lens) in outs.items():
        assert len(lens) == -(-n // bs) and sum(lens) == len(stored)
        with tempfile.TemporaryFile() as f:
            f.write(bytes(512) + stored)
            f.flush()
            table = array.array("I", lens).tobytes()
            for D in (C, R):                     # each decodes the other's blocks
                z = D.ZFileBacking(f.fileno(), 0, 512, 512 + len(stored), table, bs, algo, verify, n, "z")
                assert z.pread(0, n + 10) == data
                z.verify_all()
    # No byte equality: python-lz4's block.compress goes through
    # LZ4_compress_fast_continue on a fresh stream (not LZ4_compress_default),
    # and the zstandard wheel bundles libzstd 1.5.7 against the system's 1.5.4.


def test_compress_blocks_errors():
    on_both_fails(lambda M: M.compress_blocks(3, b"x", 512, False))
    on_both_fails(lambda M: M.compress_blocks(1, b"x", 0, False))
    assert on_both(lambda M: M.compress_blocks(1, b"", 4096, False)) == ("ok", (b"", []))   # no data, no block
    on_both_fails(lambda M: M.compress_blocks(1, b"", 2**31, False), UsageError)   # not a ZFile block size
    on_both_fails(lambda M: M.compress_blocks(1, b"x", 2**31, False), UsageError)
    on_both_fails(lambda M: M.compress_blocks(1, b"x", -1, False))
    on_both_fails(lambda M: M.compress_blocks(2, "text", 512, False))


def zfile_block_size_ok(bs):
    """What the ZFile reader accepts (format.zfile._check_geometry)."""
    return 512 <= bs <= 65536 and bs & (bs - 1) == 0


@FAST
@given(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([1 << k for k in range(32)]),
                 st.sampled_from([1 << k for k in range(32)]).map(lambda b: b + 1)),
       st.integers(1, 2), st.booleans(), st.integers(0, 3000))
def test_compress_blocks_takes_what_the_reader_takes(bs, algo, verify, n):
    """compress_blocks accepts exactly the block sizes a ZFile reader opens
    (powers of two from 512 to 65536), with or without data, and refuses any
    other naming it; empty data is a valid body of no blocks, which both
    cores then read back as a 0-byte ZFile."""
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    if not zfile_block_size_ok(bs):
        out = on_both_fails(lambda M: M.compress_blocks(algo, data, bs, verify), UsageError)
        assert f"block_size {bs}" in out[2], out
        return
    outs = {M: M.compress_blocks(algo, data, bs, verify) for M in (C, R)}
    for M, (stored, lens) in outs.items():
        assert len(lens) == -(-n // bs) and sum(lens) == len(stored)
        with tempfile.TemporaryFile() as f:
            f.write(bytes(512) + stored)
            f.flush()
            table = array.array("I", lens).tobytes()
            for D in (C, R):
                z = D.ZFileBacking(f.fileno(), 0, 512, 512 + len(stored), table, bs, algo, verify, n, "z")
                assert z.pread(0, n + 10) == data


# ---------------------------------------------------------------- index: inserts and replay
@FAST
@given(st.lists(st.tuples(wild_u64, wild_len, wild_moff, st.booleans(), st.integers(0, 255)), max_size=40))
def test_insert_sequences(ops):
    idx = {M: M.Index() for M in (C, R)}
    model = {}
    for off, ln, mo, z, tag in ops:
        res = on_both(lambda M: idx[M].insert(off, ln, mo, z, tag))
        if res[0] == "ok" and ln:
            model_insert(model, off, ln, mo, z, tag)
    recs = idx[C].records()
    assert recs == idx[R].records()
    assert expand(recs) == model
    assert idx[C].check_sorted() == idx[R].check_sorted() == -1
    assert idx[C].dump(3) == idx[R].dump(3)
    assert idx[C].data_sectors() == idx[R].data_sectors() == sum(1 for v in model.values() if not v[1])
    ends = sorted({0, 1} | {r[0] for r in recs} | {r[0] + r[1] for r in recs})
    for x in ends + [e - 1 for e in ends if e] + [2**64 - 1]:
        assert idx[C].find(x) == idx[R].find(x)


@FAST
@given(rec_ops(n=60), st.lists(st.tuples(st.integers(0, 260), st.integers(0, 80)), max_size=10))
def test_insert_then_lookup(ops, queries):
    idx = {M: build_index(M, ops) for M in (C, R)}
    model = {}
    for off, ln, mo, z in ops:
        model_insert(model, off, ln, mo, z)
    for off, ln in queries + [(0, 2**64 - 1), (5, 2**64 - 5), (2**64 - 1, 1)]:
        got = idx[C].lookup(off, ln)
        assert got == idx[R].lookup(off, ln)
        want = {s: v for s, v in model.items() if off <= s < off + ln}
        assert expand(got) == want


@FAST
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 60), st.integers(0, 2**55 - 1),
                          st.booleans(), st.integers(0, 255), st.booleans()), max_size=40))
def test_replay_log(entries):
    log = b"".join(raw_record(INVALID if inv else off, ln, mo, z, tag)
                   for off, ln, mo, z, tag, inv in entries)
    log += b"\x07" * (len(entries) % 16)            # a torn tail record is ignored
    idx = {M: M.Index() for M in (C, R)}
    for M in (C, R):
        idx[M].replay(log)
    model = {}
    for off, ln, mo, z, tag, inv in entries:
        if not inv and ln:
            model_insert(model, off, ln, mo, z, 0)
    assert idx[C].records() == idx[R].records()
    assert expand(idx[C].records()) == model


# ---------------------------------------------------------------- index: raw bytes
raw_records = st.lists(st.tuples(
    st.one_of(st.integers(0, 400), st.just(INVALID), st.integers(0, INVALID)),
    st.one_of(st.integers(0, 40), st.integers(0, MAX_LENGTH)),
    st.one_of(st.integers(0, 500), st.integers(0, MAX_MOFFSET)),
    st.integers(0, 1), st.integers(0, 255)), max_size=40)


@FAST
@given(st.one_of(raw_records.map(lambda rs: b"".join(raw_record(*r) for r in rs)), st.binary(max_size=400)),
       st.booleans(), st.integers(0, 600), st.integers(0, 600), st.integers(-1, 5))
def test_from_raw(data, keep_tags, lo, hi, pad):
    idx = {M: M.Index.from_raw(data, keep_tags) for M in (C, R)}
    a, b = idx[C], idx[R]
    assert a.records() == b.records()
    assert len(a) == len(b) == sum(1 for i in range(len(data) // 16)
                                   if struct.unpack_from("<Q", data, 16 * i)[0] & INVALID != INVALID)
    assert a.check_sorted() == b.check_sorted()
    assert a.check_moffset(lo, hi) == b.check_moffset(lo, hi)
    assert a.data_sectors() == b.data_sectors()
    assert a.dump(pad) == b.dump(pad)
    if keep_tags:
        assert C.Index.from_raw(a.dump()).records() == [r[:4] + (0,) for r in a.records()]
    for i in (-1, 0, len(a) - 1, len(a)):
        on_both(lambda M: idx[M].record(i))
    if a.check_sorted() == -1:                    # lookups are specified on sorted indexes only
        for x in (0, 1, 7, 100, 399, 2**50, 2**64 - 1):
            assert a.find(x) == b.find(x)
            assert a.lookup(x, 50) == b.lookup(x, 50)


@FAST
@given(st.lists(st.tuples(st.integers(0, 2**50), st.integers(0, 2**32 - 1), st.integers(0, 2**55),
                          st.integers(0, 255), st.integers(0, 255)), max_size=20),
       st.integers(1, 6))
def test_from_records_and_dump(recs, pad):
    a, b = C.Index.from_records(recs), R.Index.from_records(recs)
    assert a.records() == b.records() == [tuple(r) for r in recs]
    assert a.dump(pad) == b.dump(pad)
    assert a.check_sorted() == b.check_sorted()
    assert a.data_sectors() == b.data_sectors()


def test_from_records_errors():
    for recs in ([(1, 2, 3, 4)], [(1, 2, 3, 4, 5, 6)], [(-1, 1, 0, 0, 0)], [(0, 2**32, 0, 0, 0)],
                 [(0, 1, 0, 256, 0)], [(0, 1, 0, 0, "t")], [None], 5):
        on_both_fails(lambda M: M.Index.from_records(recs).records(), TypeError, ValueError, OverflowError,
                      FormatError)
    # a flag may be a bool; zeroed is the one flag among the fields
    assert on_both(lambda M: M.Index.from_records([(1, 1, 0, True, 0)]).records()) == ("ok", [(1, 1, 0, 1, 0)])


REC_FIELDS = ("offset", "length", "moffset", "zeroed", "tag")


@FAST
@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**14), st.integers(0, 2**40),
                          st.integers(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.data())
def test_from_records_refuses_non_int(recs, data):
    """A float (or a bool where a number is meant, or a str) in any field is
    refused by both modules with a FormatError naming the record, the field
    and the value: never truncated into a record pointing somewhere else."""
    i = data.draw(st.integers(0, len(recs) - 1))
    f = data.draw(st.integers(0, 4))
    bad = data.draw(st.one_of(st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=2**20),
                              st.sampled_from(["7", b"7", None])
                              | (st.booleans() if REC_FIELDS[f] != "zeroed" else st.nothing())))
    rec = list(recs[i])
    rec[f] = bad
    recs = recs[:i] + [tuple(rec)] + recs[i + 1:]
    out = on_both_fails(lambda M: M.Index.from_records(recs), FormatError)
    _cls, (path, field, value, why) = out[1], out[2]
    assert field == f"record {i} {REC_FIELDS[f]}" and value is bad, out


# ---------------------------------------------------------------- merge
@FAST
@given(st.lists(rec_ops(max_off=150, n=25), max_size=6))
def test_merge_layers(layer_ops):
    layers = {M: [build_index(M, ops) for ops in layer_ops] for M in (C, R)}
    merged = {M: M.merge(layers[M]) for M in (C, R)}
    recs = merged[C].records()
    assert recs == merged[R].records()
    assert merged[C].check_sorted() == -1
    models = []
    for ops in layer_ops:
        m = {}
        for off, ln, mo, z in ops:
            model_insert(m, off, ln, mo, z)
        models.append(m)
    assert expand(recs) == model_merge(models)
    for x in range(0, 200, 3):
        assert merged[C].find(x) == merged[R].find(x)
        assert merged[C].lookup(x, 17) == merged[R].lookup(x, 17)


@SLOW
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 5)), min_size=64, max_size=400),
       st.integers(0, 2**32), st.integers(0, 40))
def test_merge_large_uses_bucket_search(gaps, seed, shift):
    """>= 64 records: _lsmt.merge builds its bucket table; find must not change."""
    recs, pos = [], 0
    for ln, gap in gaps:
        pos += gap
        recs.append((pos << shift, ln, pos, 0, 0))
        pos += ln
    if (recs[-1][0] + recs[-1][1]) >= 2**50:
        return
    top = recs[::3]
    a = C.merge([C.Index.from_records(top), C.Index.from_records(recs)])
    b = R.merge([R.Index.from_records(top), R.Index.from_records(recs)])
    assert a.records() == b.records()
    rng = random.Random(seed)
    end = a.record(len(a) - 1)[0] + a.record(len(a) - 1)[1]
    keys = [rng.randrange(end + 100) for _ in range(300)] + [r[0] for r in recs] + [r[0] + r[1] for r in recs]
    for k in keys:
        assert a.find(k) == b.find(k)
    buf = array.array("Q", keys).tobytes()
    assert C.bench_find(a, buf)[0] == R.bench_find(b, buf)[0]
    a.build_search()
    b.build_search()
    assert [a.find(k) for k in keys] == [b.find(k) for k in keys]


@FAST
@given(st.integers(64, 400), st.lists(st.integers(2, 10**6), min_size=1, max_size=4), st.integers(0, 2**32))
def test_bucket_search_with_far_records(n, factors, seed):
    """Dense records at the start and a few far out (a backup GPT at the end of
    the disk): the bucket table is sized by the dense part, and lookups past
    it search the sparse tail; find must equal the reference's everywhere."""
    rng = random.Random(seed)
    recs, pos = [], 0
    for _ in range(n):
        pos += rng.randrange(0, 8)
        ln = rng.randrange(1, 64)
        recs.append((pos, ln, pos, 0, 0))
        pos += ln
    dense = pos
    for f in sorted(set(factors)):
        far = dense * f + rng.randrange(100)
        if far + 8 >= 2**50 or far < pos:
            continue
        recs.append((far, 8, far, 0, 0))
        pos = far + 8
    a, b = C.Index.from_records(recs), R.Index.from_records(recs)
    a.build_search()
    b.build_search()
    keys = [rng.randrange(dense + 16) for _ in range(200)] + [rng.randrange(pos + 100) for _ in range(200)]
    keys += [r[0] + d for r in recs for d in (-1, 0, r[1] - 1, r[1]) if r[0] + d >= 0] + [2**64 - 1]
    assert [a.find(k) for k in keys] == [b.find(k) for k in keys]


def test_merge_errors():
    on_both_fails(lambda M: M.merge((M.Index(),)))
    on_both_fails(lambda M: M.merge([None]))
    on_both_fails(lambda M: M.merge([M.Index(), 3]))
    on_both_fails(lambda M: M.merge([M.Index()] * 256))
    assert on_both(lambda M: M.merge([]).records()) == ("ok", [])


# ---------------------------------------------------------------- files for stack reads
class Layer:
    """One backing file plus the records that point into it, built once and
    opened by both modules."""

    def __init__(self, kind, plain, base, size, ops, truncate=None, zparams=None):
        self.kind, self.plain, self.base, self.size, self.ops = kind, plain, base, size, ops
        self.f = tempfile.TemporaryFile()
        if kind == "raw":
            body = plain if truncate is None else plain[:truncate]
            self.f.write(bytes(base) + body)
        else:
            algo, bs, verify, enc = zparams
            stored, lens = enc.compress_blocks(algo, plain, bs, verify)
            self.table = array.array("I", lens).tobytes()
            self.zargs = (512, 512 + len(stored), self.table, bs, algo, verify, len(plain))
            image = bytes(base) + b"H" * 512 + stored + self.table
            self.f.write(image if truncate is None else image[:truncate])
        self.f.flush()
        self.flen = self.f.seek(0, 2)
        self.model = {}
        for off, ln, mo, z in ops:
            model_insert(self.model, off, ln, mo, z)

    def open(self, M, name):
        if self.kind == "raw":
            return M.RawBacking(self.f.fileno(), self.base, self.size, name)
        z = M.ZFileBacking(self.f.fileno(), self.base, *self.zargs, name)
        z.map_blocks()          # the core decodes from a mapping, the reference preads
        return z

    def close(self):
        self.f.close()


@st.composite
def layers_st(draw, upper=False):
    kind = "raw" if upper else draw(st.sampled_from(["raw", "zfile"]))
    nsect = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32))
    size = nsect * SECTOR
    plain = plain_data(seed, size)
    base = draw(st.sampled_from([0, 1, 512, 4096 + 7]))
    # mostly in range; a long record or a high moffset runs past the data
    ops = draw(st.lists(st.tuples(st.integers(0, 64), st.one_of(st.integers(1, 8), st.integers(1, 24)),
                                  st.integers(0, nsect), st.booleans()), min_size=1, max_size=12))
    truncate, zparams = None, None
    if kind == "raw":
        declared = draw(st.sampled_from([size, size, size, size - 100, size + 1024]))
        if draw(st.integers(0, 4)) == 0:
            truncate = draw(st.integers(0, size))
        return ("raw", plain, base, declared, ops, truncate, None)
    cut = draw(st.sampled_from([0, 0, 0, 1, 300]))
    plain = plain[:len(plain) - cut]
    zparams = (draw(st.integers(1, 2)), draw(st.sampled_from([512, 1024, 4096])), draw(st.booleans()),
               draw(st.sampled_from([C, R])))
    return ("zfile", plain, base, len(plain), ops, None, zparams)


def expected_read(layers, upper, s, n):
    """Model bytes of sectors [s, s+n), or the set of acceptable error classes."""
    lower = model_merge([ly.model for ly in layers])
    out = bytearray()
    errors = set()
    for sec in range(s, s + n):
        if upper is not None and sec in upper.model:
            src, (mo, z, _t) = upper, upper.model[sec]
        elif sec in lower:
            mo, z, li = lower[sec]
            src = layers[li]
        else:
            out += bytes(SECTOR)
            continue
        if z:
            out += bytes(SECTOR)
            continue
        a, b = mo * SECTOR, (mo + 1) * SECTOR
        if b > src.size:
            errors.add(CorruptDataError)          # past the backing's size
        elif src.kind == "raw" and src.base + b > src.flen:
            errors.add(ReadError)                 # the file is shorter than declared
        out += src.plain[a:b].ljust(SECTOR, b"\0")
    return errors or bytes(out)


@SLOW
@given(st.lists(layers_st(), min_size=1, max_size=4), st.one_of(st.none(), layers_st(upper=True)),
       st.lists(st.tuples(st.integers(0, 70), st.integers(0, 40)), min_size=1, max_size=5))
def test_stack_read(layer_specs, upper_spec, reads):
    layers = [Layer(*sp) for sp in layer_specs]
    event(f"zfile layers: {sum(ly.kind == 'zfile' for ly in layers)}")
    upper = Layer(*upper_spec) if upper_spec is not None else None
    try:
        files = {M: [ly.open(M, f"L{i}") for i, ly in enumerate(layers)] for M in (C, R)}
        if upper is not None:
            for M in (C, R):
                files[M].append(upper.open(M, "upper"))
        stacks = {}
        for M in (C, R):
            lower = M.merge([build_index(M, ly.ops) for ly in layers]) if layers else None
            up = build_index(M, upper.ops, tag=7) if upper is not None else None
            stacks[M] = M.Stack(files[M], lower, up)
        for s, n in reads:
            got = on_both(lambda M: stacks[M].read(s * SECTOR, n * SECTOR))
            want = expected_read(layers, upper, s, n)
            event(f"read: {got[1].__name__ if got[0] == 'err' else ('data' if any(got[1]) else 'zeros')}")
            if isinstance(want, set):
                assert got[0] == "err" and got[1] in want, (got, want)
            else:
                assert got == ("ok", want)
            lk = on_both(lambda M: stacks[M].lookup(s, n))
            if upper is not None:
                merged_model = {**{k: (v[0], v[1], v[2]) for k, v in
                                   model_merge([ly.model for ly in layers]).items()},
                                **{k: (v[0], v[1], len(layers)) for k, v in upper.model.items()}}
            else:
                merged_model = model_merge([ly.model for ly in layers])
            assert expand(lk[1]) == {k: v for k, v in merged_model.items() if s <= k < s + n}
            # read_into a larger buffer's slice, and Backing.pread of each file
            buf = {M: bytearray(n * SECTOR + 1024) for M in (C, R)}
            on_both(lambda M: stacks[M].read_into(memoryview(buf[M])[512:512 + n * SECTOR], s * SECTOR))
        for i in range(len(files[C])):
            for off, ln in ((0, 700), (100, 2**64 - 1), (files[C][i].size, 5), (2**64 - 1, 1)):
                on_both(lambda M: files[M][i].pread(off, ln))
    finally:
        for ly in layers + ([upper] if upper else []):
            ly.close()


def test_stack_read_edges():
    with tempfile.TemporaryFile() as f:
        f.write(os.urandom(8192))
        f.flush()
        mk = lambda M: M.Stack([M.RawBacking(f.fileno(), 0, 8192, "f")],  # noqa: E731
                               M.Index.from_records([(0, 16, 0, 0, 0)]))
        on_both_fails(lambda M: mk(M).read(1, 512))                  # unaligned offset
        on_both_fails(lambda M: mk(M).read(0, 100))                  # unaligned length
        assert on_both(lambda M: mk(M).read(2**64 - 512, 1024)) == ("ok", bytes(1024))   # past the end: zeros
        on_both_fails(lambda M: mk(M).read_into(b"\0" * 512, 0))     # not writable
        assert on_both(lambda M: mk(M).read(0, 0)) == ("ok", b"")
        on_both_fails(lambda M: mk(M).read(-512, 512))
        on_both_fails(lambda M: M.Stack([], None, M.Index()))          # upper without its file
        on_both_fails(lambda M: M.Stack([M.RawBacking(f.fileno(), 0, 1)], M.Index.from_records([(0, 1, 0, 0, 1)])))
        on_both_fails(lambda M: M.Stack([M.RawBacking(f.fileno(), 0, 1)], M.Index.from_records([(0, 1, 0, 0, 0)]),
                                  M.Index()))                  # lower tag == upper tag
        on_both_fails(lambda M: M.Stack((M.RawBacking(f.fileno(), 0, 1),)))
        on_both_fails(lambda M: M.Stack([None]))
        on_both_fails(lambda M: M.Stack([M.RawBacking(f.fileno(), 0, 1)] * 257))
        on_both_fails(lambda M: M.Stack([], 5))
        on_both_fails(lambda M: M.Stack([], C.Index() if M is R else R.Index()))   # the other module's Index
        assert on_both(lambda M: M.Stack([]).lookup(0, 10)) == ("ok", [])
        lk = on_both(lambda M: M.Stack([M.RawBacking(f.fileno(), 0, 8192)] * 2,
                                       M.Index.from_records([(5, 3, 0, 0, 0), (100, 3, 0, 0, 0)]),
                                       M.Index.from_records([(55, 3, 0, 0, 0)])).lookup(32, 2**64 - 1))
        assert lk == ("ok", [(55, 3, 0, 0, 1), (100, 3, 0, 0, 0)])     # no wrap past 2^64

        # a record whose moffset runs past 2^64 bytes must not wrap around to byte 0
        top = raw_record(0, 2, MAX_MOFFSET)
        for off in (0, 512):
            got = on_both(lambda M: M.Stack([M.RawBacking(f.fileno(), 0, 8192, "f")],
                                            M.Index.from_raw(top)).read(off, 512))
            assert got[0] == "err" and got[1] is CorruptDataError
        got = on_both(lambda M: M.RawBacking(f.fileno(), 0, 2**64 - 1, "f").pread(0, 2**64 - 1))
        assert got[1] is MemoryError
        # file offsets past off_t, and base + offset past 2^64 (must not wrap to byte 0)
        for base, off in ((0, 2**63 - 512), (0, 2**64 - 512), (4096, 2**64 - 512)):
            got = on_both(lambda M: M.RawBacking(f.fileno(), base, 2**64 - 1, "f").pread(off, 1024))
            assert got[1] is ReadError
        stored, lens = C.compress_blocks(1, bytes(1000), 512, True)
        table = array.array("I", lens).tobytes()
        got = on_both(lambda M: M.ZFileBacking(f.fileno(), 2**64 - 100, 0, len(stored), table, 512, 1, True,
                                               1000, "z").pread(0, 1000))
        assert got[1] is ReadError

        def mutated(M):                                        # lower changed after __init__
            low = M.Index()
            st_ = M.Stack([M.RawBacking(f.fileno(), 0, 8192, "f")], low)
            low.insert(0, 1, 0, False, 9)
            return st_.read(0, 512)
        on_both(mutated)

        def bad_fd(M):
            return M.Stack([M.RawBacking(-1, 0, 8192, "bad")], M.Index.from_records([(0, 1, 0, 0, 0)])).read(0, 512)
        assert on_both(bad_fd)[1] is ReadError


def test_backing_argument_errors():
    on_both_fails(lambda M: M.RawBacking(2**31, 0, 0))
    on_both_fails(lambda M: M.RawBacking(0, -1, 0))
    on_both_fails(lambda M: M.RawBacking(0, 0, 0, 5))
    assert on_both(lambda M: M.RawBacking(0, 0, 0, None).name) == ("ok", None)
    assert on_both(lambda M: M.RawBacking(3, 5, 7, "n").pread(7, 1)) == ("ok", b"")    # at the end: empty
    assert on_both(lambda M: (M.Backing().size, M.Backing().fd, M.Backing().name, M.Backing().pread(0, 5))) == \
        ("ok", (0, 0, None, b""))
    on_both_fails(lambda M: M.ZFileBacking(0, 0, 0, 0, b"", 4096, 1, False, 2**64 - 1))
    on_both_fails(lambda M: M.ZFileBacking(0, 0, 0, 0, [1, 2], 4096, 1, False, 2))
    assert on_both(lambda M: M.ZFileBacking(0, 0, 0, 0, b"", 4096, 1, False, 0).nblocks) == ("ok", 0)


# ---------------------------------------------------------------- zfile errors
@st.composite
def zfile_st(draw):
    algo = draw(st.integers(1, 2))
    bs = draw(st.sampled_from([512, 1024, 4096]))
    verify = draw(st.booleans())
    n = draw(st.integers(1, 6 * bs))
    return algo, bs, verify, plain_data(draw(st.integers(0, 2**32)), n), draw(st.sampled_from([C, R]))


def make_zfile(algo, bs, verify, data, enc, base=0):
    stored, lens = enc.compress_blocks(algo, data, bs, verify)
    f = tempfile.TemporaryFile()
    f.write(bytes(base) + b"H" * 512 + stored + array.array("I", lens).tobytes())
    f.flush()
    return f, stored, lens


@SLOW
@given(zfile_st(), st.integers(0, 2**32), st.integers(1, 255), st.lists(st.tuples(st.integers(0, 30000),
                                                                          st.integers(0, 30000)), max_size=4))
def test_zfile_flipped_byte(z, where_seed, xor, reads):
    algo, bs, verify, data, enc = z
    f, stored, lens = make_zfile(algo, bs, verify, data, enc)
    with f:
        pos = random.Random(where_seed).randrange(len(stored))
        f.seek(512 + pos)
        b = f.read(1)[0]
        f.seek(512 + pos)
        f.write(bytes([b ^ xor]))
        f.flush()
        blk, acc = 0, 0
        while acc + lens[blk] <= pos:
            acc += lens[blk]
            blk += 1
        table = array.array("I", lens).tobytes()
        zb = {M: M.ZFileBacking(f.fileno(), 0, 512, 512 + len(stored), table, bs, algo, verify, len(data), "z")
              for M in (C, R)}
        lenient = algo == 2 and not verify
        got = on_both(lambda M: zb[M].verify_all(), lenient)
        if verify:
            assert got[0] == "err" and got[1] is CorruptDataError and got[2][1] == f"zfile block {blk} crc"
        for off, ln in reads + [(blk * bs, 1), (0, len(data))]:
            got = on_both(lambda M: zb[M].pread(off, ln), lenient)
            event(f"verify={verify} pread: {got[1].__name__ if got[0] == 'err' else 'ok'}")
            hit = off < len(data) and off // bs <= blk <= (min(off + ln, len(data)) - 1) // bs and ln > 0
            if verify and hit:
                assert got[0] == "err" and got[2][1] == f"zfile block {blk} crc"
            elif got[0] == "ok" and not hit:
                assert got[1] == data[off:off + ln]


@SLOW
@given(zfile_st(), st.sampled_from(["zero", "big", "past_end", "count", "short_count", "truncate", "odd_len"]),
       st.integers(0, 2**32))
def test_zfile_bad_tables(z, how, seed):
    algo, bs, verify, data, enc = z
    f, stored, lens = make_zfile(algo, bs, verify, data, enc)
    rng = random.Random(seed)
    with f:
        lens = list(lens)
        data_end = 512 + len(stored)
        size = len(data)
        i = rng.randrange(len(lens))
        field = None
        if how == "zero":
            lens[i] = rng.choice([0, 4 if verify else 0])
            field = f"jump table entry {i}"
        elif how == "big":
            bound = (bs + bs // 255 + 16 if algo == 1 else bs + (bs >> 8) + (((128 << 10) - bs) >> 11)) + 4
            lens[i] = bound + rng.choice([0, 1])
            field = f"jump table entry {i}" if lens[i] > bound else None
        elif how == "past_end":
            data_end -= rng.randrange(1, 5)
            field = "jump table"
        elif how == "count":
            size += bs
            field = "index_size"
        elif how == "short_count":
            lens = lens[:-1]
            field = "index_size"
        table = array.array("I", lens).tobytes()
        if how == "odd_len":
            table += b"\1\2"                     # a torn entry is ignored
        if how == "truncate":
            f.truncate(512 + rng.randrange(len(stored)))
        got = on_both(lambda M: M.ZFileBacking(f.fileno(), 0, 512, data_end, table, bs, algo, verify,
                                               size, "z").nblocks)
        if field is not None:
            assert got[0] == "err" and got[1] is FormatError and got[2][1] == field
            return
        if how == "big":                          # exactly at the bound: accepted, read fails or not
            on_both(lambda M: M.ZFileBacking(f.fileno(), 0, 512, 2**40, table, bs, algo, verify,
                                             size, "z").pread(0, size))
            return
        assert got == ("ok", len(lens))
        zb = {M: M.ZFileBacking(f.fileno(), 0, 512, data_end, table, bs, algo, verify, size, "z") for M in (C, R)}
        for k in range(len(lens)):
            on_both(lambda M: zb[M].block_extent(k))
        on_both(lambda M: zb[M].block_extent(len(lens)))
        got = on_both(lambda M: zb[M].pread(0, size))
        if how == "truncate":
            assert got[0] == "err" and got[1] is ReadError
        else:
            assert got == ("ok", data)


def test_zfile_constructor_errors():
    with tempfile.TemporaryFile() as f:
        fd = f.fileno()
        on_both_fails(lambda M: M.ZFileBacking(fd, 0, 0, 0, b"", 1000, 1, False, 0))
        on_both_fails(lambda M: M.ZFileBacking(fd, 0, 0, 0, b"", 256, 1, False, 0))
        on_both_fails(lambda M: M.ZFileBacking(fd, 0, 0, 0, b"", 131072, 1, False, 0))
        on_both_fails(lambda M: M.ZFileBacking(fd, 0, 0, 0, b"", 4096, 3, False, 0))
        on_both_fails(lambda M: M.ZFileBacking(fd, 0, 10, 5, b"", 4096, 1, False, 0))
        # one byte of data and a CRC: accepted when opened; the file is empty, so reading fails
        on_both(lambda M: M.ZFileBacking(fd, 0, 0, 100, b"\5\0\0\0", 4096, 1, True, 1))
        on_both_fails(lambda M: M.ZFileBacking(fd, 0, 0, 100, b"\5\0\0\0", 4096, 1, True, 1).pread(0, 1),
                      ReadError)
        on_both_fails(lambda M: M.ZFileBacking(fd, 0, 0, 100, b"\4\0\0\0", 4096, 1, True, 1),
                      FormatError)                  # a block of only its CRC
        # blocks ending past 2^64: _lsmt reports the wrapped end, the model the true one
        on_both_loose(lambda M: M.ZFileBacking(fd, 0, 2**64 - 3, 2**64 - 1, b"\5\0\0\0", 4096, 1, False, 1))
        on_both_fails(lambda M: M.ZFileBacking(fd, 0, 0, 100, b"\5\0\0\0", 4096, 1, False, 1).pread(0, 1))  # short file


# ---------------------------------------------------------------- warp (TurboOCI) layers
def disjoint_records(draw, n, kinds, moff_max):
    """Sorted, disjoint (offset, length, moffset, zeroed, tag) records."""
    recs, pos = [], 0
    for _ in range(n):
        pos += draw(st.integers(0, 6))
        ln = draw(st.integers(1, 9))
        kind = draw(st.sampled_from(kinds))
        mo = draw(st.integers(0, moff_max))
        recs.append((pos, ln, mo, int(kind == "zero"), 1 if kind == "target" else 0))
        pos += ln
    return recs


@SLOW
@given(st.data())
def test_warp_stack_read(data):
    """A normal layer above and below a warp layer (meta file + target): the
    warp index's tags are normalised, merged with file bases, and tag-1 pieces
    read the target, zero-filled past its end; both modules equal the model."""
    draw = data.draw
    tlen = draw(st.integers(0, 5000))
    tag_base = draw(st.sampled_from([0, 0, 3, 254]))
    above = disjoint_records(draw, draw(st.integers(0, 5)), ["meta", "zero"], 20)
    warp = disjoint_records(draw, draw(st.integers(0, 8)), ["meta", "target", "target", "zero"], 14)
    below = disjoint_records(draw, draw(st.integers(0, 5)), ["meta"], 20)
    blobs = {name: os.urandom(n) for name, n in (("above", 32 * SECTOR), ("meta", 32 * SECTOR),
                                                 ("target", tlen), ("below", 32 * SECTOR))}
    # overlaybd's rule: tags less the smallest present (only tag-1 records: all read the meta file)
    shift = min((r[4] for r in warp), default=0)
    fs = {}
    try:
        for name, blob in blobs.items():
            fs[name] = tempfile.TemporaryFile()
            fs[name].write(blob)
            fs[name].flush()

        def build(M):
            files = [M.RawBacking(fs[n].fileno(), 0, len(blobs[n]), n) for n in ("above", "meta", "target", "below")]
            files[2].zero_fill_past_end = True
            widx = M.Index.from_records([r[:4] + (r[4] + tag_base,) for r in warp])
            lo, bad = widx.normalise_tags(1)
            assert bad == -1 and lo == (tag_base + shift if warp else 0)
            lower = M.merge([M.Index.from_records(above), widx, M.Index.from_records(below)], [0, 1, 3])
            return M.Stack(files, lower)
        stacks = {M: build(M) for M in (C, R)}
        # the model: top-first layers, sector -> bytes
        model = {}
        for recs, src in ((above, "above"), (warp, None), (below, "below")):
            for off, ln, mo, z, tag in recs:
                for k in range(ln):
                    if off + k in model:
                        continue
                    if z:
                        model[off + k] = bytes(SECTOR)
                        continue
                    blob = blobs[src or ("target" if tag - shift else "meta")]
                    model[off + k] = blob[(mo + k) * SECTOR:(mo + k + 1) * SECTOR].ljust(SECTOR, b"\0")
        for _ in range(4):
            s, n = draw(st.integers(0, 90)), draw(st.integers(0, 40))
            want = b"".join(model.get(sec, bytes(SECTOR)) for sec in range(s, s + n))
            assert on_both(lambda M: stacks[M].read(s * SECTOR, n * SECTOR)) == ("ok", want)
        # a target's pread is not clamped: zeros past its end
        assert on_both(lambda M: stacks[M].backings[2].pread(max(0, tlen - 10), 30)) == \
            ("ok", blobs["target"][max(0, tlen - 10):] + bytes(30 - min(10, tlen)))
    finally:
        for f in fs.values():
            f.close()


def test_warp_tags_and_bases_errors():
    """normalise_tags names the first tag left above the limit; merge refuses
    bases that do not fit the layers or would pass file 255."""
    for M in (C, R):
        idx = M.Index.from_records([(0, 1, 0, 0, 5), (1, 1, 0, 0, 7), (2, 1, 0, 0, 6)])
        assert idx.normalise_tags(1) == (5, 1)
        assert [r[4] for r in idx.records()] == [0, 2, 1]
        assert M.Index().normalise_tags(1) == (0, -1)
        idx = M.Index.from_records([(0, 1, 0, 0, 0), (1, 1, 3, 0, 1), (2, 1, 9, 1, 1)])
        assert idx.check_starts(1, 3) == 1 and idx.check_starts(1, 4) == -1 and idx.check_starts(0, 0) == 0
        assert idx.check_moffset(0, 1, 0) == -1 and idx.check_moffset(0, 1) == 1
    on_both_fails(lambda M: M.merge([M.Index()], [0, 1]))
    on_both_fails(lambda M: M.merge([M.Index.from_records([(0, 1, 0, 0, 1)])], [255]), FormatError)
    assert on_both(lambda M: M.merge([M.Index.from_records([(0, 1, 0, 0, 1)])], [254]).records()) == \
        ("ok", [(0, 1, 0, 0, 255)])


def test_warp_gzip_target_zero_fill(tmp_path):
    """A gzip target (GzipBacking) flagged as a warp target reads zeros past
    the decompressed end, in a stack and through pread, in both modules;
    unflagged it fails (E_SHORT) as before."""
    import gzip as _gzip
    from tcmu_obd.format import gzindex
    plain = os.urandom(3000)
    (tmp_path / "t.gz").write_bytes(_gzip.compress(plain))
    with open(tmp_path / "t.gz", "rb") as f:
        gzindex.build_index(f, tmp_path / "t.idx", span=1 << 16)
    with open(tmp_path / "t.gz", "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def view(M, flag):
            g = gzindex.open_backing(M.RawBacking(f.fileno(), 0, size, "gz"), str(tmp_path / "t.idx"), "view", impl=M)
            g.zero_fill_past_end = flag
            return g
        want = plain[2560:] + bytes(1536 - 440)
        assert on_both(lambda M: view(M, True).pread(2560, 1536)) == ("ok", want)
        assert on_both(lambda M: view(M, False).pread(2560, 1536)) == ("ok", plain[2560:])   # clamped
        stack = lambda M, flag: M.Stack([view(M, flag)], M.Index.from_records([(0, 8, 4, 0, 0)]))  # noqa: E731
        assert on_both(lambda M: stack(M, True).read(0, 4096)) == ("ok", plain[2048:] + bytes(4096 - 952))
        got = on_both(lambda M: stack(M, False).read(0, 4096))
        assert got[0] == "err" and got[1] is ReadError
