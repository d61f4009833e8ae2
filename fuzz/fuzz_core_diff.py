#!/usr/bin/env python3
"""Differential fuzzing of the read core: tcmu_obd.core._lsmt against tcmu_obd.core.reference.

Run: python fuzz/fuzz_core_diff.py -max_total_time=20   (or -runs=N, or a corpus dir)

The fuzzer's bytes are decoded into a short program of operations (indexes
from raw bytes or records, inserts, replays, merges, lookups, raw and ZFile
backings over memfds, stacks, reads), which runs on both modules side by
side.  After every step the two must agree: the same result, or the same
exception class with the same fields (see `fields`: a ReadError for a short
file must name the same file end, not the same pread span, since _lsmt skips
ZFile blocks it has cached).  Where the program made the input bad on
purpose (a malformed record, a broken jump table, a flipped byte under a
CRC, a bad descriptor, an unaligned read, an unknown codec), both must also
raise: agreeing that bad input is fine is a finding too.  A disagreement
raises AssertionError, which atheris reports as a finding.  Lookups, inserts and
merges only run on indexes that are sorted and non-overlapping (elsewhere the
result is unspecified, see tcmu_obd.core.reference).

One disagreement is expected and tolerated: a damaged ZSTD block without a
CRC (verify=0) may decode under the system libzstd the C core links and fail
under the newer libzstd bundled in the zstandard wheel (1.5.7 rejects some
corrupt frames 1.5.4 accepts).  For backings damaged that way, a "block does
not decompress" error on one side against any answer on the other passes.
"""

import array
import os
import re
import struct
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    from tcmu_obd.core import reference as R
    from tcmu_obd.errors import CorruptDataError, FormatError, ObdError, ReadError

from tcmu_obd.core import _lsmt as C  # noqa: E402  (native: nothing to instrument)

INVALID = (1 << 50) - 1
MAX_MOFFSET = (1 << 55) - 1
U64 = (1 << 64) - 1
SECTOR = 512
MAX_OPS = 24
SPAN = re.compile(r" inside a read of \d+ bytes at byte \d+")


# ---------------------------------------------------------------- agreement
def fields(e):
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
    return None


def outcome(fn, M):
    try:
        res = fn(M)
        if type(res).__module__ == C.__name__ or type(res).__module__.startswith(R.__name__ + "."):
            res = ("object", type(res).__name__)
        return ("ok", res)
    except (ObdError, TypeError, ValueError, OverflowError, IndexError, BufferError, MemoryError) as e:
        return ("err", type(e), fields(e))


def is_decode_error(out):
    return (out[0] == "err" and out[1] is CorruptDataError and out[2][1].startswith("zfile block")
            and not out[2][1].endswith("crc"))


def both(what, fn, lenient=False, must_fail=False):
    """Run fn on both modules; they must agree.  Returns (ok, C result, R result).
    lenient: a decode error on either side is accepted (see the module docstring).
    must_fail: the input is bad, so both must raise."""
    res = {}
    outs = []
    for M in (C, R):
        def keep(M, fn=fn):
            r = fn(M)
            res[M] = r
            return r
        outs.append(outcome(keep, M))
    if outs[0] != outs[1] and not (lenient and (is_decode_error(outs[0]) or is_decode_error(outs[1]))):
        raise AssertionError(f"{what}: the implementations disagree\n  _lsmt:     {outs[0]!r}\n"
                             f"  reference: {outs[1]!r}")
    if must_fail and (outs[0][0] == "ok" or outs[1][0] == "ok"):
        raise AssertionError(f"{what}: bad input accepted\n  _lsmt:     {outs[0]!r}\n  reference: {outs[1]!r}")
    return outs[0][0] == "ok", res.get(C), res.get(R)


# ---------------------------------------------------------------- input decoding
class Prog:
    def __init__(self, data):
        self.fdp = atheris.FuzzedDataProvider(data)

    def left(self):
        return self.fdp.remaining_bytes()

    def int(self, lo, hi):
        return self.fdp.ConsumeIntInRange(lo, hi)

    def bool(self):
        return self.fdp.ConsumeBool()

    def bytes(self, n):
        return self.fdp.ConsumeBytes(n)

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)] if seq else None

    def u64(self, small=300):
        """Mostly small; sometimes a boundary or any 64-bit value."""
        k = self.int(0, 9)
        if k < 7:
            return self.int(0, small)
        if k == 7:
            return self.pick([INVALID - 1, INVALID, MAX_MOFFSET, MAX_MOFFSET + 1, 2**63, U64 - 511, U64, -1, 2**64])
        return self.fdp.ConsumeIntInRange(0, U64)

    def record(self, sequential_from=None):
        """(offset, length, moffset, zeroed, tag) with on-disk field widths."""
        if sequential_from is not None:
            off = sequential_from + self.int(0, 8)
        else:
            off = self.pick([self.int(0, 300), INVALID, self.int(0, INVALID)])
        ln = self.int(0, 40) if self.int(0, 7) else self.int(0, (1 << 14) - 1)
        mo = self.int(0, 600) if self.int(0, 7) else self.pick([MAX_MOFFSET, MAX_MOFFSET - 3, self.int(0, MAX_MOFFSET)])
        return off, ln, mo, self.int(0, 1), self.int(0, 3)


def raw_record(off, ln, mo, z, tag):
    return struct.pack("<QQ", (off & INVALID) | ((ln & 0x3FFF) << 50),
                       (mo & MAX_MOFFSET) | (z << 55) | (tag << 56))


def plain(prog, n):
    """n bytes from the input, stretched with runs so they compress."""
    seed = prog.bytes(prog.int(0, 64)) or b"\0"
    out = bytearray()
    while len(out) < n:
        out += seed * prog.int(1, 8) + bytes(prog.int(0, 300))
    return bytes(out[:n])


# ---------------------------------------------------------------- the program
class State:
    def __init__(self):
        self.indexes = []     # {C: Index, R: Index}
        self.files = []       # {C: Backing, R: Backing}
        self.stacks = []      # {C: Stack, R: Stack}
        self.fds = []

    def sorted_index(self, prog):
        cand = [ix for ix in self.indexes if ix[C].check_sorted() == -1]
        return prog.pick(cand)

    def close(self):
        for fd in self.fds:
            os.close(fd)


def add_index(st, name, fn, must_fail=False):
    ok, a, b = both(name, fn, must_fail=must_fail)
    if ok:
        assert a.records() == b.records(), name
        assert a.check_sorted() == b.check_sorted(), name
        st.indexes.append({C: a, R: b})


def op_from_raw(prog, st):
    if prog.bool():
        data = prog.bytes(16 * prog.int(0, 12) + prog.int(0, 15))
    else:
        recs, pos = [], 0
        seq = prog.bool()
        for _ in range(prog.int(0, 20)):
            r = prog.record(pos if seq else None)
            pos = r[0] + r[1]
            recs.append(r)
        data = b"".join(raw_record(*r) for r in recs)
    keep = prog.bool()
    add_index(st, "from_raw", lambda M: M.Index.from_raw(data, keep))


def op_from_records(prog, st):
    recs, pos = [], 0
    seq = prog.bool()
    bad = False
    for _ in range(prog.int(0, 20)):
        off, ln, mo, z, tag = prog.record(pos if seq else None)
        if prog.int(0, 15) == 0:          # a C-typed field out of range, or a bad shape
            bad = True
            recs.append(prog.pick([(off, -1, mo, z, tag), (off, 2**32, mo, z, tag), (off, ln, mo, 256, tag),
                                   (off, ln, mo), (off, ln, mo, z, tag, 0), None]))
        else:
            recs.append((off, ln, mo, prog.pick([z, z, 2]), tag))
        pos = off + ln
    add_index(st, "from_records", lambda M: M.Index.from_records(recs), must_fail=bad)


def op_insert(prog, st):
    ix = st.sorted_index(prog)
    if ix is None:
        return
    for _ in range(prog.int(1, 8)):
        a = (prog.u64(), prog.u64(40), prog.u64(600), prog.bool(), prog.pick([0, 0, 1, 2, 9, 255, 256]))
        both("insert", lambda M: ix[M].insert(*a))
    assert ix[C].records() == ix[R].records(), "insert"


def op_replay(prog, st):
    ix = st.sorted_index(prog)
    if ix is None:
        return
    if prog.bool():
        data = prog.bytes(16 * prog.int(0, 12) + prog.int(0, 15))
    else:
        data = b"".join(raw_record(*prog.record()) for _ in range(prog.int(0, 12)))
    both("replay", lambda M: ix[M].replay(data))
    assert ix[C].records() == ix[R].records(), "replay"


def op_query(prog, st):
    ix = prog.pick(st.indexes)
    if ix is None:
        return
    both("len", lambda M: len(ix[M]))
    i = prog.pick([0, 1, len(ix[C]) - 1, len(ix[C]), -1, 2**63])
    both("record", lambda M: ix[M].record(i))
    lo, hi = prog.u64(600), prog.u64(600)
    both("check_moffset", lambda M: ix[M].check_moffset(lo, hi))
    both("data_sectors", lambda M: ix[M].data_sectors())
    pad = prog.pick([-1, 0, 1, 2, 3, 256])
    both("dump", lambda M: ix[M].dump(pad))
    if ix[C].check_sorted() != -1:
        return
    for _ in range(prog.int(1, 4)):
        x, n = prog.u64(), prog.u64(80)
        both(f"find({x})", lambda M: ix[M].find(x))
        both(f"lookup({x}, {n})", lambda M: ix[M].lookup(x, n))
    if prog.int(0, 7) == 0:
        keys = array.array("Q", [prog.int(0, 400) for _ in range(prog.int(0, 20))]).tobytes()
        both("bench_find", lambda M: M.bench_find(ix[M], keys)[0])
    if prog.bool():
        both("build_search", lambda M: ix[M].build_search())


def op_merge(prog, st):
    n = prog.int(0, 5)
    chosen = [st.sorted_index(prog) for _ in range(n)]
    if any(c is None for c in chosen):
        return
    if prog.int(0, 15) == 0:
        add_index(st, "merge", lambda M: M.merge([ix[M] for ix in chosen] + [None]), must_fail=True)
    add_index(st, "merge", lambda M: M.merge([ix[M] for ix in chosen]))


def new_fd(st, data):
    fd = os.memfd_create("core-diff")
    st.fds.append(fd)
    os.write(fd, data)
    return fd


def op_raw_backing(prog, st):
    body = plain(prog, SECTOR * prog.int(0, 16) + prog.pick([0, 0, 1, 100]))
    base = prog.pick([0, 1, 512, 4096])
    fd = new_fd(st, bytes(base) + body)
    size = prog.pick([len(body), len(body), len(body) + SECTOR, max(0, len(body) - 700), prog.u64(20000)])
    if prog.int(0, 15) == 0:
        fd = -1
    name = prog.pick(["raw", "raw", None])
    ok, a, b = both("RawBacking", lambda M: M.RawBacking(fd, base, size, name))
    if ok:
        # reads of [off, end) must fail when they reach past the bytes there are, or fd is bad
        st.files.append({C: a, R: b, "lenient": False, "avail": 0 if fd < 0 else len(body)})


def op_zfile_backing(prog, st):
    algo = prog.pick([1, 2])
    bs = prog.pick([512, 1024, 4096])
    verify = prog.bool()
    data = plain(prog, prog.int(0, 5 * bs))
    enc = prog.pick([C, R])
    stored, lens = enc.compress_blocks(algo, data, bs, verify)
    stored = bytearray(stored)
    original = bytes(stored) + array.array("I", lens).tobytes()     # what the blocks' bytes were
    base = prog.pick([0, 3, 4096])
    size = len(data)
    data_end = 512 + len(stored)
    lenient = False
    lens_changed = False
    for _ in range(prog.int(0, 2)):       # damage
        how = prog.int(0, 5)
        if how == 0 and stored:
            stored[prog.int(0, len(stored) - 1)] ^= prog.int(1, 255)
            lenient |= algo == 2 and not verify
        elif how == 1 and lens:
            new = prog.pick([0, 4, 5, 70000, prog.int(0, 5000)])
            i = prog.int(0, len(lens) - 1)
            lens_changed |= new != lens[i]
            lens[i] = new
            lenient |= algo == 2 and not verify
        elif how == 2:
            size = prog.pick([size + 1, max(0, size - 1), size + bs, prog.u64(100000)])
        elif how == 3:
            data_end = prog.pick([data_end - 1, data_end + 1000, prog.u64(5000)])
        elif how == 4 and stored:
            stored = stored[:prog.int(0, len(stored) - 1)]
    # what the constructor must refuse, judged on the final values (a second
    # damage can undo the first: size + 1, then size - 1)
    bad_table = (any(n == 0 or n == 70000 or (verify and n == 4) for n in lens)
                 or -(-size // bs) != len(lens)
                 or (not lens_changed and data_end < 512 + sum(lens)))
    # with CRCs, verify_all must fail when a byte the blocks cover changed (a
    # flip undone, or a cut that the table's first bytes happen to refill, is no damage)
    covered = sum(lens)
    now = bytes(stored) + array.array("I", lens).tobytes()
    bad_blocks = verify and now[:covered] != original[:covered]
    image = bytes(base) + b"H" * 512 + bytes(stored) + array.array("I", lens).tobytes()
    fd = new_fd(st, image)
    table = array.array("I", lens).tobytes() + (b"\1" if prog.int(0, 7) == 0 else b"")
    ok, a, b = both("ZFileBacking", lambda M: M.ZFileBacking(fd, base, 512, data_end, table, bs, algo,
                                                              verify, size, "zf"), must_fail=bad_table)
    if ok:
        if prog.int(0, 1):
            a.map_blocks()      # the core's mapped decode path against the reference's preads
        f = {C: a, R: b, "lenient": lenient, "bad_blocks": bad_blocks and not lens_changed and size > 0}
        both("nblocks", lambda M: f[M].nblocks)
        st.files.append(f)


def op_backing(prog, st):
    f = prog.pick(st.files)
    if f is None:
        return
    for _ in range(prog.int(1, 3)):
        off, n = prog.u64(20000), prog.u64(9000)
        if (1 << 20) <= min(n, f[C].size - off) < (1 << 63):
            n = 1 << 20                   # keep allocations small (2^63 and up: MemoryError)
        short = "avail" in f and off < f[C].size and min(off + n, f[C].size) > f["avail"] and n > 0
        both(f"pread({off}, {n})", lambda M: f[M].pread(off, n), f["lenient"], must_fail=short)
    both("size", lambda M: (f[M].size, f[M].name))
    if isinstance(f[C], C.ZFileBacking):
        if prog.bool():
            both("verify_all", lambda M: f[M].verify_all(), f["lenient"], must_fail=f["bad_blocks"])
        i = prog.u64(12)
        both("block_extent", lambda M: f[M].block_extent(i))


def op_stack(prog, st):
    files = [prog.pick(st.files) for _ in range(prog.int(0, 5))]
    if any(f is None for f in files):
        return
    lower = st.sorted_index(prog) if prog.int(0, 3) else None
    upper = st.sorted_index(prog) if prog.bool() else None
    ok, a, b = both("Stack", lambda M: M.Stack([f[M] for f in files],
                                               lower[M] if lower else None, upper[M] if upper else None))
    if ok:
        st.stacks.append({C: a, R: b, "lenient": any(f["lenient"] for f in files)})


def op_read(prog, st):
    s = prog.pick(st.stacks)
    if s is None:
        return
    for _ in range(prog.int(1, 4)):
        if prog.int(0, 15):
            off, n = SECTOR * prog.int(0, 300), SECTOR * prog.int(0, 64)
        else:
            off, n = prog.u64(), prog.pick([0, 1, 511, 512, 1024])
        unaligned = bool(off % SECTOR or n % SECTOR)
        both(f"Stack.read({off}, {n})", lambda M: s[M].read(off, n), s["lenient"], must_fail=unaligned)
        if prog.int(0, 3) == 0:
            both("Stack.read_into", lambda M: s[M].read_into(memoryview(bytearray(n + 1024))[1024:], off),
                 s["lenient"], must_fail=unaligned)
        x, k = prog.u64(), prog.u64(80)
        both(f"Stack.lookup({x}, {k})", lambda M: s[M].lookup(x, k))


def op_codec(prog, st):
    data = prog.bytes(prog.int(0, 64))
    seed = prog.u64(2**32 - 1)
    both("crc32c", lambda M: M.crc32c(data, seed))
    algo, bs, verify = prog.pick([1, 2, 3]), prog.pick([0, 512, 1000, 4096]), prog.bool()
    data = plain(prog, prog.int(0, 3 * 4096))
    ok, a, b = both("compress_blocks", lambda M: len(M.compress_blocks(algo, data, bs, verify)[1]),
                    must_fail=algo == 3 or bs in (0, 1000))     # 1000: not a ZFile block size
    if not ok or bs not in (512, 4096):
        return
    # whichever encoder: both decoders read the blocks back to the same data
    for enc in (C, R):
        stored, lens = enc.compress_blocks(algo, data, bs, verify)
        fd = new_fd(st, stored)
        table = array.array("I", lens).tobytes()
        ok, x, y = both("decode", lambda M: M.ZFileBacking(fd, 0, 0, len(stored), table, bs, algo, verify,
                                                            len(data)).pread(0, len(data)))
        assert ok and x == data, "round trip"


OPS = [op_from_raw, op_from_records, op_insert, op_replay, op_query, op_merge, op_raw_backing,
       op_zfile_backing, op_backing, op_stack, op_read, op_read, op_codec]


def TestOneInput(data):
    prog = Prog(data)
    st = State()
    try:
        for _ in range(MAX_OPS):
            if prog.left() == 0:
                break
            prog.pick(OPS)(prog, st)
    finally:
        st.close()


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
