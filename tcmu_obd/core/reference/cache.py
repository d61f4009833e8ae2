"""Cache presence and fetch for the pure-Python twin (tcmu_obd.core.reference):
Presence (which units of a cached remote file hold data), fetch_all(), and
recover(), the step after a failed read (fetch the misses, evict and refetch
a block that failed its check, or give up), as _lsmt_cache.pxi does them.

It knows no registry or cache directory (a fetcher object does the work)
and reads no backing itself (reference.backing calls check_present()).
"""
import os
import errno as _errno
import threading

from tcmu_obd.core.fileio import punch_hole
from tcmu_obd.errors import ReadError, UsageError
from tcmu_obd.core.reference._common import (E_CRC, E_DECODE, E_MISS, MAX_CRC_RETRIES, MAX_MISS_ROUNDS,
                                             ReadFail, u64)

_use_clock = 0
_clock_lock = threading.Lock()


class Presence:
    """Which `unit`-sized pieces of a cached file hold data."""

    def __init__(self, size, unit):
        size, unit = u64(size), u64(unit)
        if unit < 512 or unit & (unit - 1):
            raise UsageError(f"presence unit {unit}: must be a power of two >= 512")
        self._unit = unit
        self._size = size
        self._n = -(-size // unit)
        self._bits = bytearray(self._n)
        self._lock = threading.RLock()
        self.touch()


    @property
    def unit(self):
        return self._unit

    def _units(self, offset, length, whole):
        end = min(offset + length, self._size)
        if length == 0 or offset >= self._size:
            return range(0)
        if whole:
            first = -(-offset // self._unit)
            last = self._n if end == self._size else end // self._unit
        else:
            first, last = offset // self._unit, -(-end // self._unit)
        return range(first, last)

    def set(self, offset, length):
        with self._lock:
            for u in self._units(offset, length, True):
                self._bits[u] = 1

    def clear(self, offset, length):
        with self._lock:
            for u in self._units(offset, length, False):
                self._bits[u] = 0

    def _first_missing(self, offset, length):
        """(offset, length) from the first to the last missing unit, or None."""
        miss = [u for u in self._units(offset, length, False) if not self._bits[u]]
        if not miss:
            return None
        lo = miss[0] * self._unit
        return lo, min((miss[-1] + 1) * self._unit, self._size) - lo

    def has(self, offset, length):
        return self._first_missing(offset, length) is None

    def count(self, offset, length):
        return sum(min((u + 1) * self._unit, self._size) - u * self._unit
                   for u in self._units(offset, length, False) if self._bits[u])

    def touch(self):
        global _use_clock
        with _clock_lock:
            _use_clock += 1
            self._used = _use_clock

    @property
    def last_used(self):
        return self._used

    def evict(self, fd, offset, length):
        with self._lock:
            units = self._units(offset, length, False)
            freed = self.count(offset, length)
            for u in units:
                self._bits[u] = 0
            if fd < 0 or not units:
                return freed, 0
            lo, hi = units.start * self._unit, min(units.stop * self._unit, self._size)
            try:
                punch_hole(fd, lo, hi - lo)
            except OSError as e:
                return freed, e.errno
            return freed, 0

    def pread(self, fd, offset, length):
        if length > self._size or offset > self._size - length:
            raise UsageError(f"read of {length} bytes at {offset} is past the blob's {self._size} bytes")
        with self._lock:
            if not self.has(offset, length):
                return None
            out = os.pread(fd, length, offset)
        if len(out) != length:
            raise OSError(_errno.EIO, os.strerror(_errno.EIO))
        return out

    def store(self, fd, data, offset):
        if len(data) > self._size or offset > self._size - len(data):
            raise UsageError(f"write of {len(data)} bytes at {offset} is past the blob's {self._size} bytes")
        with self._lock:
            view = memoryview(data)
            pos = offset
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
            for u in self._units(offset, len(data), True):
                self._bits[u] = 1

    def bitmap(self):
        out = bytearray((self._n + 7) // 8)
        for u in range(self._n):
            if self._bits[u]:
                out[u >> 3] |= 1 << (u & 7)
        return bytes(out)

    def set_bitmap(self, bits):
        if len(bits) != (self._n + 7) // 8:
            raise UsageError(f"bitmap of {len(bits)} bytes for {self._n} units")
        with self._lock:
            for u in range(self._n):
                if (bits[u >> 3] >> (u & 7)) & 1:
                    self._bits[u] = 1

    def missing(self, offset, length):
        out = []
        for u in self._units(offset, length, False):
            if not self._bits[u]:
                lo, hi = u * self._unit, min((u + 1) * self._unit, self._size)
                if out and out[-1][0] + out[-1][1] == lo:
                    out[-1] = (out[-1][0], out[-1][1] + hi - lo)
                else:
                    out.append((lo, hi - lo))
        return out


def check_present(backing, foff, n):
    if backing._presence is not None:
        miss = backing._presence._first_missing(foff, n)
        if miss is not None:
            raise ReadFail(E_MISS, miss[0], miss[1])


def fetch_all(jobs):
    """Run fetcher.ensure(off, n) for every job, concurrently when there are
    several (one thread each; the first error is raised after all end)."""
    if len(jobs) == 1:
        jobs[0][0].ensure(jobs[0][1], jobs[0][2])
        return
    errors = []

    def run(fetcher, off, n):
        try:
            fetcher.ensure(off, n)
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=run, args=job, name="obd-ref-fetch") for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def recover(err, files, tries):
    """As _lsmt.recover: fetch what the cache lacks or evict a bad block;
    True means read again.  `tries` counts refetches per (file, block) and
    fetch rounds per read call."""
    if err.code == E_MISS:
        tries["miss"] = tries.get("miss", 0) + 1
        if tries["miss"] > MAX_MISS_ROUNDS:
            name = files[err.which].name if 0 <= err.which < len(files) else "<backing>"
            raise ReadError(f"{name}: bytes {err.a}..{err.a + err.b} were evicted again before the read "
                            f"could use them, {MAX_MISS_ROUNDS} times (cache too small for this read?)")
    if not 0 <= err.which < len(files):
        return False
    b = files[err.which]
    if b.fetcher is None:
        return False
    if err.code == E_MISS:
        pin = getattr(b.fetcher, "pin", None)
        if pin is not None:
            tries.setdefault("pins", []).append((b.fetcher, pin(err.a, err.b)))
        b.fetcher.ensure(err.a, err.b)
        return True
    key = (err.which, err.a)
    if err.code in (E_CRC, E_DECODE) and hasattr(b, "block_extent") and err.a < b.nblocks \
            and tries.get(key, 0) < MAX_CRC_RETRIES:
        tries[key] = tries.get(key, 0) + 1
        start, length = b.block_extent(err.a)
        b.fetcher.evict(b._base + start, length)
        return True
    return False


def unpin_all(tries):
    for f, token in tries.pop("pins", ()):
        f.unpin(token)
