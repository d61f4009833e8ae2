"""The local `file` cache of remote blobs, in overlaybd's layout: one sparse
file per blob, `<cacheDir>/sha256:<hex>`, the size of the blob, filled in
`refillSize` units (spec/runtime.md §e).

It fetches missing units from a source (anything with read(offset, length)),
at most once per unit however many threads miss on it, records what is
present in a core Presence bitmap (so the read core can tell a hole from
data without the GIL), evicts ranges that failed a check, and keeps the
directory under cacheSizeGB by evicting least recently used blobs.  It does
not talk HTTP (tcmu_obd.registry) or parse layers (tcmu_obd.layer).
"""
import errno
import logging
import os
import threading
from collections import OrderedDict

from . import core
from .errors import ReadError
from .rw import punch_hole, pwrite_all

log = logging.getLogger(__name__)
PAGE = 4096
GiB = 1 << 30


class FileCache:
    def __init__(self, cache_dir, size_gb=4, refill_size=262144):
        if refill_size <= 0 or refill_size % PAGE or refill_size & (refill_size - 1):
            raise ValueError(f"refillSize {refill_size}: must be a power of two and a multiple of {PAGE}")
        os.makedirs(cache_dir, exist_ok=True)
        self.dir = cache_dir
        self.capacity = int(size_gb * GiB)
        self.water = max(int(0.9 * self.capacity), self.capacity - 50 * GiB)
        self.risk = max(self.capacity - 5 * GiB, (self.water + self.capacity) // 2)
        self.refill = refill_size
        self.lock = threading.Lock()
        self.open_blobs = {}            # name -> CachedBlob
        self.lru = OrderedDict()        # name -> bytes on disk, least recently used first
        self.used = 0
        self._scan()

    def _scan(self):
        """Rebuild the accounting from the directory (state survives restarts)."""
        entries = []
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if not os.path.isfile(path):
                continue
            entries.append((st.st_atime, name, st.st_blocks * 512))
        for _atime, name, used in sorted(entries):
            self.lru[name] = used
            self.used += used

    def path(self, name):
        return os.path.join(self.dir, os.path.basename(name))

    def open(self, name, size, source):
        """A CachedBlob for blob `name` (e.g. 'sha256:<hex>') of `size` bytes."""
        name = os.path.basename(name)
        with self.lock:
            blob = self.open_blobs.get(name)
            if blob is not None and blob.size == size:
                blob.refs += 1
                return blob
            blob = CachedBlob(self, name, size, source)
            self.open_blobs[name] = blob
            self.lru.setdefault(name, 0)
            self.lru.move_to_end(name)
            return blob

    def _release(self, blob):
        with self.lock:
            blob.refs -= 1
            if blob.refs == 0 and self.open_blobs.get(blob.name) is blob:
                del self.open_blobs[blob.name]
                blob._close_fd()

    def touch(self, name, grown=0):
        """Note a use of a blob and the bytes it added; evict if over the mark."""
        with self.lock:
            if name in self.lru:
                self.lru[name] += grown
                self.lru.move_to_end(name)
            else:
                self.lru[name] = grown
            self.used += grown
            over = self.used >= self.risk
        if over:
            self.evict_to_water()

    def evict_to_water(self, protect=None):
        """Evict whole blobs from the LRU tail until used <= water mark (or
        free disk >= 1 GiB).  Bounded: each blob is visited once."""
        with self.lock:
            victims = [n for n in self.lru if n != protect]
        for name in victims:
            with self.lock:
                if self.used <= self.water:
                    return
            if _free_bytes(self.dir) >= GiB and self.used <= self.capacity:
                return
            self._evict_blob(name)

    def _evict_blob(self, name):
        with self.lock:
            blob = self.open_blobs.get(name)
            freed = self.lru.pop(name, 0)
            self.used -= freed
        if blob is not None:
            blob.evict(0, blob.size)            # open: punch everything, keep the file
            with self.lock:
                self.lru[name] = 0
                self.lru.move_to_end(name, last=False)
        else:
            try:
                os.unlink(self.path(name))
            except FileNotFoundError:
                pass
        log.info("cache: evicted %s (%d bytes)", name, freed)


def _free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class CachedBlob:
    """One blob's cache file, its Presence bitmap and its refills."""

    def __init__(self, cache, name, size, source):
        self.cache = cache
        self.name = name
        self.size = size
        self.source = source
        self.unit = cache.refill
        self.refs = 1
        self.lock = threading.Lock()
        self.inflight = {}              # unit index -> Event
        path = cache.path(name)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st = os.fstat(self.fd)
        if st.st_size != size:
            os.ftruncate(self.fd, 0)        # a stale or foreign file: start empty
            os.ftruncate(self.fd, size)
        self.presence = core.Presence(size, self.unit)
        self._rebuild()

    def _rebuild(self):
        """Mark units whose bytes are all allocated in the cache file."""
        pos = 0
        while pos < self.size:
            try:
                b = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            e_ = min(os.lseek(self.fd, b, os.SEEK_HOLE), self.size)
            first = -(-b // self.unit) * self.unit
            last = e_ if e_ == self.size else e_ - e_ % self.unit
            if last > first:
                self.presence.set(first, last - first)
            pos = e_

    # ------------------------------------------------------------ reading
    def read_at(self, offset, length):
        """Bytes of the blob (clamped to its size), fetched into the cache first."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        self.ensure(offset, length)
        return os.pread(self.fd, length, offset)

    def ensure(self, offset, length):
        """Make [offset, offset+length) present; each unit is fetched once."""
        end = min(self.size, offset + length)
        if offset >= end:
            return
        u0, u1 = offset // self.unit, (end - 1) // self.unit + 1
        for _attempt in range(4):
            mine, theirs = [], []
            with self.lock:
                for u in range(u0, u1):
                    if self.presence.has(u * self.unit, 1):
                        continue
                    ev = self.inflight.get(u)
                    if ev is None:
                        self.inflight[u] = threading.Event()
                        mine.append(u)
                    else:
                        theirs.append(ev)
            if not mine and not theirs:
                return
            try:
                for lo, hi in _runs(mine):
                    self._fill(lo, hi)
            finally:
                with self.lock:
                    for u in mine:
                        self.inflight.pop(u).set()
            for ev in theirs:
                ev.wait()
        missing = self.presence.missing(offset, end - offset)
        if missing:
            raise ReadError(f"{self.path}: could not fill {missing[0]} after repeated refills")

    def _fill(self, u_lo, u_hi):
        start = u_lo * self.unit
        stop = min(self.size, u_hi * self.unit)
        data = self.source.read(start, stop - start)
        if len(data) != stop - start:
            raise ReadError(f"{self.name}: source returned {len(data)} bytes for a read of "
                            f"{stop - start} at {start}")
        for attempt in (0, 1):
            try:
                pwrite_all(self.fd, data, start)
                break
            except OSError as e:
                if e.errno != errno.ENOSPC or attempt:
                    raise ReadError(f"{self.path}: cannot store {len(data)} bytes at {start}: "
                                    f"{e.strerror} (cache disk full)") from None
                self.cache.evict_to_water(protect=self.name)
        self.presence.set(start, stop - start)
        self.cache.touch(self.name, stop - start)

    def evict(self, offset, length):
        """Forget a range (units touched) and punch it out of the cache file."""
        lo = offset - offset % self.unit
        hi = min(self.size, -(-(offset + length) // self.unit) * self.unit)
        with self.lock:
            self.presence.clear(lo, hi - lo)
            if hi > lo:
                try:
                    punch_hole(self.fd, lo, hi - lo)
                except OSError:
                    pass

    def close(self):
        self.cache._release(self)

    def _close_fd(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _runs(units):
    """Consecutive runs [lo, hi) of sorted unit numbers."""
    runs = []
    for u in units:
        if runs and runs[-1][1] == u:
            runs[-1][1] = u + 1
        else:
            runs.append([u, u + 1])
    return [(a, b) for a, b in runs]

