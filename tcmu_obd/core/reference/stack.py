"""Read-merge over a stack for the pure-Python twin (tcmu_obd.core.reference):
Stack (upper RW index over the merged lower index, adjacent pieces of one
file coalesced into one backing read, holes as zeros), as _lsmt_stack.pxi
does it.

It has no C entry point (the TCMU ring needs _lsmt), builds no indexes and
decodes no blocks itself.
"""
import threading

from tcmu_obd.errors import UsageError
from tcmu_obd.core.reference._common import (E_RANGE, E_TAG, ReadFail, SECTOR, U64, raise_fail, typed, u64,
                                             wbuf)
from tcmu_obd.core.reference.index import Index, rec_end
from tcmu_obd.core.reference.cache import recover, unpin_all
from tcmu_obd.core.reference.backing import Backing


class _Pending:
    """A data read not issued yet; the next contiguous one extends it."""
    __slots__ = ("tag", "foff", "dst", "len")

    def __init__(self):
        self.tag = self.foff = self.dst = self.len = 0


class Stack:
    """Read-merge over a stack: `files` top-first (lower tags index it),
    the merged lower Index, and an optional upper (RW) Index whose records
    read from files[-1], or, with upper_files=2 (a TurboOCI warp upper, build
    tools only), tag 0 from files[-2] and tag 1 from files[-1].  Upper data and zeroed records both shadow the
    lower stack; only holes fall through; a hole everywhere reads as zeros."""

    def __init__(self, files, lower=None, upper=None, upper_files=1):
        self._swap = threading.Lock()          # a read holds it; restack() waits for it
        self._set(files, lower, upper, upper_files)

    def _set(self, files, lower, upper, upper_files):
        if files is not None and type(files) is not list:
            raise TypeError(f"Argument 'files' has incorrect type (expected list, got {type(files).__name__})")
        typed(lower, Index, "lower")
        typed(upper, Index, "upper")
        if len(files) > 256:
            raise UsageError(f"too many backing files: {len(files)}")
        for f in files:
            if not isinstance(f, Backing):
                raise TypeError(f"Cannot convert {type(f).__name__} to tcmu_obd.core.reference.Backing")
        if upper_files not in (1, 2) or (upper is None and upper_files != 1):
            raise UsageError(f"upper_files {upper_files}: 1, or 2 for a warp upper")
        if upper is not None and len(files) < upper_files:
            raise UsageError("an upper index needs its backing file last in `files`")
        if upper is not None and upper is lower:
            raise UsageError("the upper index cannot also be the lower one")
        lower_tags = len(files) - upper_files if upper is not None else len(files)
        if lower is not None:
            for i, r in enumerate(lower._recs):
                if r[4] >= lower_tags:
                    raise UsageError(f"lower record {i} has tag {r[4]}, no such file")
        self._files = list(files)
        self._lower = lower
        self._upper = upper
        self._upper_files = upper_files
        self._upper_tag = len(self._files) - upper_files
        self._lower_tags = lower_tags

    def restack(self, keep, files, lower=None, upper=None, upper_files=1):
        """Serve a new file table and indexes from now on (a live snapshot):
        the first `keep` files of the current table, then `files`.  Reads
        running finish on the old ones first.  A refused table leaves the
        stack as it was."""
        with self._swap:
            if not 0 <= keep <= len(self._files):
                raise UsageError(f"keep {keep}: the stack has {len(self._files)} files")
            self._set(self._files[:keep] + list(files), lower, upper, upper_files)

    @property
    def lower(self):
        return self._lower

    @property
    def upper(self):
        return self._upper

    # Reads are collected the way the C core collects them (a data piece that
    # continues the pending one in the same file and the same buffer extends
    # it), so a failing read reports the same offset, length and error.
    def _flush(self, p, dst):
        if p.len:
            try:
                self._files[p.tag]._readinto(dst[p.dst:p.dst + p.len], p.foff)
            except ReadFail as err:
                err.which = p.tag
                raise
        p.len = 0

    def _emit(self, r, tag, s, e, dst, base, p):
        """Serve sectors [s, e) of record r into dst (dst starts at sector base)."""
        d = (s - base) * SECTOR
        n = (e - s) * SECTOR
        if r[3]:
            dst[d:d + n] = bytes(n)
            return
        if r[2] + (s - r[0]) >= 1 << 55:         # past 2^64 bytes: the C core reports 2^64-1
            err = ReadFail(E_RANGE, U64, n, self._files[tag].size)
            err.which = tag
            raise err
        foff = (r[2] + (s - r[0])) * SECTOR
        if p.len and p.tag == tag and p.foff + p.len == foff and p.dst + p.len == d:
            p.len += n
            return
        self._flush(p, dst)
        p.tag, p.foff, p.dst, p.len = tag, foff, d, n

    def _read_lower(self, s, e, dst, base, p):
        pos = s
        if self._lower is not None:
            recs = self._lower._recs
            i = self._lower._first_end_after(s)
            while i < len(recs) and recs[i][0] < e:
                r = recs[i]
                if r[4] >= self._lower_tags:
                    raise ReadFail(E_TAG, r[0], r[4])
                rs = max(r[0], pos)
                if rs > pos:
                    dst[(pos - base) * SECTOR:(rs - base) * SECTOR] = bytes((rs - pos) * SECTOR)
                re = min(rec_end(r), e)
                self._emit(r, r[4], rs, re, dst, base, p)
                pos = re
                i += 1
        if pos < e:
            dst[(pos - base) * SECTOR:(e - base) * SECTOR] = bytes((e - pos) * SECTOR)

    def _read(self, dst, s, e):
        with self._swap:
            self._read_stack(dst, s, e)

    def _read_stack(self, dst, s, e):
        p = _Pending()
        if self._upper is None:
            self._read_lower(s, e, dst, s, p)
        else:
            with self._upper._lock:             # inserts wait until the walk is done
                recs = self._upper._recs
                pos = s
                i = self._upper._first_end_after(s)
                while i < len(recs) and recs[i][0] < e:
                    r = recs[i]
                    rs = max(r[0], pos)
                    if rs > pos:
                        self._read_lower(pos, rs, dst, s, p)
                    re = min(rec_end(r), e)
                    ut = r[4] if self._upper_files > 1 else 0     # a plain RW upper ignores tags
                    if ut >= self._upper_files:
                        raise ReadFail(E_TAG, r[0], r[4])
                    self._emit(r, self._upper_tag + ut, rs, re, dst, s, p)
                    pos = re
                    i += 1
                if pos < e:
                    self._read_lower(pos, e, dst, s, p)
        self._flush(p, dst)

    def read_into(self, buf, offset):
        """Fill the writable buffer `buf` with the stack's bytes at `offset`.
        offset and len(buf) must be multiples of 512."""
        offset = u64(offset)
        dst = wbuf(buf)
        n = len(dst)
        if offset % SECTOR or n % SECTOR:
            raise UsageError(f"read of {n} bytes at {offset} is not 512-byte aligned")
        tries = {}
        try:
            while True:
                try:
                    self._read(dst, offset // SECTOR, (offset + n) // SECTOR)
                    return None
                except ReadFail as err:
                    if not recover(err, self._files, tries):
                        raise_fail(err, self._files)
        finally:
            unpin_all(tries)

    def replace_file(self, tag, backing):
        """Serve file `tag` from another backing with the same bytes."""
        if not 0 <= tag < len(self._files):
            raise UsageError(f"no file with tag {tag}")
        typed(backing, Backing, "backing", none_ok=False)
        if self._files[tag].size != backing.size:
            raise UsageError(f"replacement for file {tag} has {backing.size} bytes, not {self._files[tag].size}")
        self._files[tag] = backing

    @property
    def backings(self):
        return list(self._files)

    def read(self, offset, length):
        offset, length = u64(offset), u64(length)
        out = bytearray(length)
        self.read_into(out, offset)
        return bytes(out)

    def lookup(self, offset, length):
        """The effective records for [offset, offset+length) in sectors:
        upper records (tag = upper file) with lower ones in their holes."""
        offset, length = u64(offset), u64(length)
        if self._upper is None:
            return self._lower.lookup(offset, length) if self._lower is not None else []
        out = []
        pos = offset
        end = offset + length
        for r in self._upper.lookup(offset, length):
            if r[0] > pos and self._lower is not None:
                out.extend(self._lower.lookup(pos, r[0] - pos))
            out.append((r[0], r[1], r[2], r[3], self._upper_tag + (r[4] if self._upper_files > 1 else 0)))
            pos = r[0] + r[1]
        if pos < end and self._lower is not None:
            out.extend(self._lower.lookup(pos, end - pos))
        return out
