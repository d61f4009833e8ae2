"""The local `file` cache of remote blobs, in overlaybd's layout: one sparse
file per blob, `<cacheDir>/sha256:<hex>`, the size of the blob, filled in
`refillSize` units (docs/runtime.md, Blob cache).

It fetches missing units from a source (anything with read(offset, length)),
at most once per unit however many threads miss on it, records what is
present in a core Presence bitmap (so the read core can tell a hole from
data without the GIL), evicts ranges that failed a check, and keeps the
directory under cacheSizeGB by evicting least recently used blobs.  It does
not talk HTTP (tcmu_obd.remote.registry) or parse layers (tcmu_obd.image.layer).

What is present is never inferred from the file's allocation (a file system
such as ramfs reports no holes, and a crash can leave allocated garbage):
it is kept in a sidecar `<blob>.presence` beside the blob file (the blob
file itself is laid out as overlaybd's).  The sidecar only ever claims
units whose bytes are durable: a fill's data is fdatasync'ed before a
sidecar records it, and an eviction durably drops the units from the
sidecar before it punches them.  No valid sidecar: the blob starts empty.

Eviction is safe against readers: a read checks presence and reads the
bytes under the blob's Presence lock held shared (in the core, without the
GIL); eviction clears and punches under it held exclusive.  Eviction order
is the last use, which the core stamps on every read (Presence.last_used).

Cold reads overlap (for far registries): one request's missing runs, and
pieces of a long run, are fetched concurrently; a blob whose misses follow
each other gets read-ahead (a window doubling up to `readahead` bytes,
fetched by a thread pool in requests a quarter of the window long, its
units registered in flight so readers wait for them instead of fetching
again).  Every fetch holds a slot of its
source's origin (at most `max_requests` requests per registry) and its bytes
of a cache-wide buffer budget (`max_buffer`); read-ahead takes at most half
of either, so demand reads always find room.  Closing a blob cancels its
queued read-ahead and waits for the running one before the file is closed.
"""
import collections
import errno
import logging
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from tcmu_obd import core, stats
from tcmu_obd.errors import FormatError, ReadError

log = logging.getLogger(__name__)
PAGE = 4096
GiB = 1 << 30
SIDECAR = ".presence"           # suffix of a blob's presence file
_MAGIC = b"OBDPRES1"
_HDR = struct.Struct("<8sQIIQQQ16s")   # magic, blob size, unit, flags, st_dev, st_ino, units, file id
_ID_XATTR = "user.tcmu_obd.cache_id"    # a random id of the blob file, where xattrs work
PERSIST_EVERY = 5.0             # seconds between sidecar writes while a blob is being filled
MAX_ROUNDS = 64                 # fill rounds one request may take (its units evicted again meanwhile)
MiB = 1 << 20
PIECE = 1 * MiB                 # runs longer than this are fetched as concurrent pieces of this size
RA_PIECE = 4 * MiB              # the largest read-ahead request (a quarter of the window, >= PIECE)
RA_WORKERS = 16                 # read-ahead threads per cache
SLACK = 8 * MiB                 # how far out of order a stream's misses may arrive


def _is_blob_name(name):
    return not name.startswith(".") and not name.endswith(SIDECAR) and not name.endswith(SIDECAR + ".tmp")


def reports_holes(directory):
    """Whether files in `directory` report holes through SEEK_DATA (ramfs,
    for one, calls a sparse file all data)."""
    probe = os.path.join(directory, f".holeprobe-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.unlink(probe)
        os.ftruncate(fd, 4 << 20)
        os.pwrite(fd, b"x" * PAGE, 2 << 20)
        try:
            return os.lseek(fd, 0, os.SEEK_DATA) >= 1 << 20
        except OSError:
            return False
    finally:
        os.close(fd)


class Budget:
    """A counted resource (request slots, buffered bytes) shared by fetches.
    take(n, cap) waits until `n` more fit under `cap` (<= total: read-ahead
    passes a lower cap so it never holds all of it) and returns n, or 0 if
    `cancelled()` became true first; a request larger than the cap waits
    for the budget to be empty and then takes it all.  Counts peak use."""

    def __init__(self, total):
        self.total = total
        self.used = 0
        self.peak = 0
        self.cond = threading.Condition()

    def take(self, n, cap=None, cancelled=None):
        cap = self.total if cap is None else min(cap, self.total)
        n = min(n, max(1, cap))
        with self.cond:
            while self.used + n > cap and self.used:
                if cancelled is not None and cancelled():
                    return 0
                self.cond.wait(0.05 if cancelled is not None else None)
            if cancelled is not None and cancelled():
                return 0
            self.used += n
            self.peak = max(self.peak, self.used)
            return n

    def give(self, n):
        if n:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


def _origin(source):
    """What the per-registry request bound counts by: a source's URL's
    scheme://host:port, or the source object itself."""
    url = getattr(source, "url", None)
    if isinstance(url, str):
        p = urlsplit(url)
        return f"{p.scheme}://{p.netloc}"
    return id(source)


class FileCache:
    def __init__(self, cache_dir, size_gb=4, refill_size=262144, readahead=0, max_requests=32,
                 max_buffer=64 * MiB):
        """readahead: largest read-ahead window in bytes (0: none); max_requests:
        fetches in flight per registry; max_buffer: bytes fetched and not yet
        stored, all blobs together (tcmuObd.* in docs/runtime.md)."""
        if refill_size <= 0 or refill_size % PAGE or refill_size & (refill_size - 1):
            raise ValueError(f"refillSize {refill_size}: must be a power of two and a multiple of {PAGE}")
        for key, value, low in (("readahead", readahead, 0), ("max_requests", max_requests, 1),
                                ("max_buffer", max_buffer, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"FileCache {key} = {value!r}: must be an integer >= {low}")
        self.readahead = readahead
        self.max_requests = max_requests
        self.buffer = Budget(max_buffer)
        self.slots = {}                 # origin -> Budget of requests in flight
        self._ra_pool = None
        self._demand_pool = None
        os.makedirs(cache_dir, exist_ok=True)
        self.dir = cache_dir
        self.capacity = int(size_gb * GiB)
        self.water = max(int(0.9 * self.capacity), self.capacity - 50 * GiB)
        self.risk = max(self.capacity - 5 * GiB, (self.water + self.capacity) // 2)
        self.refill = refill_size
        self.holes = reports_holes(cache_dir)
        self.lock = threading.Lock()
        self.open_blobs = {}            # name -> CachedBlob
        self.lru = {}                   # name -> bytes on disk (insertion order breaks ties)
        self.stamps = {}                # closed blob -> last use stamp (Presence.last_used)
        self.used = 0
        self.evictions = 0              # whole blobs evicted (for tests and benchmarks)
        self._scan()
        stats.track_cache(self)

    def _scan(self):
        """Rebuild the accounting from the directory (state survives restarts)."""
        entries, names = [], set()
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if not os.path.isfile(path):
                continue
            names.add(name)
            if _is_blob_name(name):
                entries.append((st.st_atime, name, st.st_blocks * 512))
        for name in names:          # a presence file whose blob is gone (or a torn write)
            if not _is_blob_name(name) and not name.startswith(".") and \
                    (name.endswith(".tmp") or name[:-len(SIDECAR)] not in names):
                _unlink(os.path.join(self.dir, name))
        for _atime, name, used in sorted(entries):
            self.lru[name] = used
            self.stamps[name] = 0       # older than any use in this process; atime order among them
            self.used += used

    def path(self, name):
        return os.path.join(self.dir, os.path.basename(name))

    def slots_for(self, source):
        with self.lock:
            key = _origin(source)
            b = self.slots.get(key)
            if b is None:
                b = self.slots[key] = Budget(self.max_requests)
            return b

    def _pool(self, kind):
        """The read-ahead pool, or the pool for a request's extra runs (made on first use)."""
        with self.lock:
            if kind == "ra":
                if self._ra_pool is None:
                    self._ra_pool = ThreadPoolExecutor(RA_WORKERS, thread_name_prefix="obd-readahead")
                return self._ra_pool
            if self._demand_pool is None:
                self._demand_pool = ThreadPoolExecutor(max(4, self.max_requests),
                                                       thread_name_prefix="obd-fill")
            return self._demand_pool

    def open(self, name, size, source):
        """A CachedBlob for blob `name` (e.g. 'sha256:<hex>') of `size` bytes."""
        name = os.path.basename(name)
        with self.lock:
            blob = self.open_blobs.get(name)
            if blob is not None:
                if blob.size != size:
                    raise ReadError(f"{blob.path}: blob {name} is open with {blob.size} bytes; "
                                    f"cannot open it again with {size} bytes")
                blob.refs += 1
                blob.closing = False
                return blob
            blob = CachedBlob(self, name, size, source)
            self.open_blobs[name] = blob
            held = blob.presence.count(0, size)
            self.used += held - self.lru.pop(name, 0)
            self.lru[name] = held
            self.stamps.pop(name, None)
            return blob

    def _release(self, blob):
        with self.lock:
            blob.refs -= 1
            if blob.refs:
                return
            blob.closing = True         # no new read-ahead; queued read-ahead gives up
        blob.wait_readahead()           # the running one ends before the file closes (it takes self.lock)
        with self.lock:
            if blob.refs == 0 and self.open_blobs.get(blob.name) is blob:
                del self.open_blobs[blob.name]
                try:
                    blob.persist()
                finally:
                    self.stamps[blob.name] = blob.presence.last_used
                    blob._close_fd()

    def _account(self, name, delta):
        with self.lock:
            if name in self.lru:
                self.lru[name] += delta
            else:
                self.lru[name] = delta
            self.used += delta
            return self.used >= self.risk

    def _stamp(self, name):
        blob = self.open_blobs.get(name)
        return blob.presence.last_used if blob is not None else self.stamps.get(name, 0)

    def evict_to_water(self):
        """Evict blobs, least recently used first, until used <= water mark
        (or free disk >= 1 GiB).  An open blob keeps the ranges pinned by
        reads in flight (CachedBlob.pin), so no read starves however small
        the cache; the cache may exceed its size by those.  Bounded: each
        blob is visited once."""
        with self.lock:
            order = sorted(((self._stamp(n), i, n) for i, n in enumerate(self.lru)))
        for _stamp, _i, name in order:
            if self._enough():
                return
            self._evict_blob(name)

    def _enough(self):
        with self.lock:
            if self.used <= self.water:
                return True
            over = self.used > self.capacity
        return _free_bytes(self.dir) >= GiB and not over

    def _evict_blob(self, name):
        with self.lock:
            blob = self.open_blobs.get(name)
            if blob is None:
                freed = self.lru.pop(name, 0)
                self.stamps.pop(name, None)
                self.used -= freed
                # the presence file goes first (durably): a crash in between
                # leaves a blob file without one, which starts empty
                path = self.path(name)
                if _unlink(path + SIDECAR):
                    _fsync_dir(self.dir)
                _unlink(path)
                self.evictions += 1
                log.info("cache: evicted %s (%d bytes)", name, freed)
                return
        freed = blob.evict_unpinned()             # open: punch all but what reads hold, keep the file
        with self.lock:
            self.evictions += 1
        log.info("cache: evicted open %s (%d bytes)", name, freed)


def _free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_id(fd, new=False):
    """The random id the cache gave this blob file (16 bytes), a fresh one if
    `new`; 16 zero bytes where the file system keeps no user xattrs (ramfs),
    leaving device and inode to tell a replaced file."""
    try:
        if new:
            ident = os.urandom(16)
            os.setxattr(fd, _ID_XATTR, ident)
            return ident
        ident = os.getxattr(fd, _ID_XATTR)
        return ident if len(ident) == 16 else bytes(16)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        return bytes(16)


def load_presence(sidecar, size, unit, st, ident):
    """The bitmap (bit u = unit u present) a presence file records for a
    blob of `size` bytes in `unit`s whose cache file has stat `st` and id
    `ident` (file_id).
    FormatError (naming the file, the field and the value) when it is not
    valid for that very file; FileNotFoundError when there is none."""
    with open(sidecar, "rb") as f:
        raw = f.read()
    units = -(-size // unit)
    want = _HDR.size + (units + 7) // 8 + 4
    if len(raw) != want:
        raise FormatError(sidecar, "length", len(raw), f"expected {want} bytes")
    crc = int.from_bytes(raw[-4:], "little")
    if core.crc32c(raw[:-4]) != crc:
        raise FormatError(sidecar, "crc", crc, f"computed 0x{core.crc32c(raw[:-4]):08x}")
    fields = dict(zip(("magic", "size", "unit", "flags", "st_dev", "st_ino", "units", "file id"),
                      _HDR.unpack_from(raw)))
    expected = {"magic": _MAGIC, "size": size, "unit": unit, "flags": 0, "st_dev": st.st_dev,
                "st_ino": st.st_ino, "units": units, "file id": ident}
    for key, value in expected.items():
        if fields[key] != value:
            raise FormatError(sidecar, key, fields[key], f"expected {value!r}"
                              + (" (written for another file)" if key in ("st_dev", "st_ino", "file id") else ""))
    return raw[_HDR.size:-4]


class CachedBlob:
    """One blob's cache file, its Presence bitmap, its presence file and its refills."""

    def __init__(self, cache, name, size, source):
        self.cache = cache
        self.name = name
        self.size = size
        self.source = source
        self.unit = cache.refill
        self.refs = 1
        self.lock = threading.Lock()
        self.inflight = {}              # unit index -> Event
        self.pins = {}                  # token -> (lo, hi): bytes a read in flight needs
        self._pin_seq = 0
        self.persist_lock = threading.Lock()    # orders presence-file writes against evictions
        self.dirty = False              # units filled since the presence file was written
        self.last_persist = time.monotonic()
        self.closing = False            # set when the last reference goes: read-ahead stops
        self._ra_active = 0             # read-ahead fills running (close waits for them)
        self._ra_idle = threading.Condition(self.lock)
        self._seq_lo = self._ra_end = -1    # the stream: last unit of its last miss, end of its read-ahead
        self._window = 0                # its read-ahead window, bytes (0: no stream)
        self._strays = collections.deque(maxlen=4)     # the last misses outside the stream, (lo, hi)
        self.readahead_units = 0        # units read ahead (for tests and benchmarks)
        path = cache.path(name)
        self.path = path
        self.sidecar = path + SIDECAR
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self.presence = core.Presence(size, self.unit)
            self.persisted = bytes((self.presence_units + 7) // 8)   # what the presence file claims
            self._load()
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def presence_units(self):
        return -(-self.size // self.unit)

    # ------------------------------------------------------------ presence file
    def _load(self):
        """Presence from the presence file, if it is valid for this very file;
        else start empty (and drop whatever bytes the file holds)."""
        st = os.fstat(self.fd)
        self.ident = file_id(self.fd)
        bits = self._read_sidecar(st) if st.st_size == self.size else None
        if bits is None:
            _unlink(self.sidecar)
            if st.st_size != self.size or st.st_blocks:
                os.ftruncate(self.fd, 0)        # a stale, foreign or unrecorded file: start empty
                os.ftruncate(self.fd, self.size)
            self.ident = file_id(self.fd, new=True)   # no older presence file can match it now
            return
        self.presence.set_bitmap(bits)
        self.persisted = bits
        if self.cache.holes:
            self._drop_holes()

    def _read_sidecar(self, st):
        """The bitmap of a valid presence file, or None (logged why)."""
        try:
            return load_presence(self.sidecar, self.size, self.unit, st, self.ident)
        except FileNotFoundError:
            return None
        except FormatError as e:
            log.warning("cache: %s; the blob starts empty", e)
            return None

    def _drop_holes(self):
        """Forget claimed units that have a hole (punched behind our back)."""
        pos = 0
        while pos < self.size:
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                return
            if hole >= self.size:
                return
            try:
                data = os.lseek(self.fd, hole, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = self.size
            self.presence.clear(hole, data - hole)
            pos = data

    def _write_sidecar(self, bits, sync_dir):
        st = os.fstat(self.fd)
        raw = _HDR.pack(_MAGIC, self.size, self.unit, 0, st.st_dev, st.st_ino, self.presence_units,
                        self.ident) + bits
        raw += core.crc32c(raw).to_bytes(4, "little")
        tmp = self.sidecar + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            if os.write(fd, raw) != len(raw):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except BaseException:
            _unlink(tmp)
            raise
        finally:
            os.close(fd)
        os.replace(tmp, self.sidecar)
        if sync_dir:
            _fsync_dir(self.cache.dir)
        self.persisted = bits

    def persist(self):
        """Record the present units in the presence file, their data synced first."""
        with self.persist_lock:
            if not self.dirty or self.fd < 0:
                return
            self.dirty = False
            self.last_persist = time.monotonic()
            bits = self.presence.bitmap()   # units set only after their bytes were written
            try:
                os.fdatasync(self.fd)
                self._write_sidecar(bits, sync_dir=False)   # old or new file: both true
            except OSError as e:
                # the old presence file stays (still true): only this progress is not recorded
                self.dirty = True
                log.warning("cache: %s: cannot record presence: %s", self.sidecar, e.strerror)

    # ------------------------------------------------------------ reading
    def pin(self, offset, length):
        """Keep [offset, offset+length) from LRU eviction until unpin(token)
        (a read between fetching its bytes and reading them)."""
        with self.lock:
            self._pin_seq += 1
            self.pins[self._pin_seq] = (offset, offset + length)
            return self._pin_seq

    def unpin(self, token):
        with self.lock:
            self.pins.pop(token, None)

    def read_at(self, offset, length):
        """Bytes of the blob (clamped to its size), fetched into the cache first."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        token = self.pin(offset, length)
        try:
            for _round in range(MAX_ROUNDS):
                self.ensure(offset, length)
                data = self.presence.pread(self.fd, offset, length)     # None: evicted meanwhile
                if data is not None:
                    self.presence.touch()
                    return data
        finally:
            self.unpin(token)
        raise ReadError(f"{self.path}: bytes {offset}..{offset + length} were evicted again before "
                        f"they could be read, {MAX_ROUNDS} times (cache too small?)")

    def ensure(self, offset, length):
        """Make [offset, offset+length) present; each unit is fetched once
        at a time, however many threads miss on it."""
        end = min(self.size, offset + length)
        if offset >= end:
            return
        u0, u1 = offset // self.unit, (end - 1) // self.unit + 1
        token = self.pin(offset, end - offset)
        try:
            if self.cache.readahead:
                self._readahead(u0, u1)
            self._ensure(offset, end, u0, u1)
        finally:
            self.unpin(token)

    def _ensure(self, offset, end, u0, u1):
        for _round in range(MAX_ROUNDS):
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
                self._fill_all([p for lo, hi in _runs(mine) for p in self._pieces(lo, hi)])
            finally:
                with self.lock:
                    for u in mine:
                        self.inflight.pop(u).set()
            for ev in theirs:
                ev.wait()
        missing = self.presence.missing(offset, end - offset)
        if missing:
            raise ReadError(f"{self.path}: bytes {missing[0][0]}..{sum(missing[0])} were evicted again "
                            f"before they could be used, {MAX_ROUNDS} times (cache too small?)")

    def _pieces(self, lo, hi, step=None):
        """Unit runs of at most `step` units (PIECE bytes) covering [lo, hi)."""
        step = step or max(1, PIECE // self.unit)
        return [(u, min(hi, u + step)) for u in range(lo, hi, step)]

    def _fill_all(self, pieces):
        """Fill unit runs concurrently: the first in this thread, the others
        in the cache's fill pool; the first error is raised after all end."""
        if len(pieces) <= 1:
            for lo, hi in pieces:
                self._fill(lo, hi)
            return
        pool = self.cache._pool("fill")
        futures = [pool.submit(self._fill, lo, hi) for lo, hi in pieces[1:]]
        error = None
        try:
            self._fill(*pieces[0])
        except BaseException as e:
            error = e
        for fut in futures:
            try:
                fut.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    # ------------------------------------------------------------ read-ahead
    def _readahead(self, u0, u1):
        """A miss at units [u0, u1).  A miss at the unit after one of the last
        stray misses starts a stream (keeping the window of a stream it is
        near: one that outran the old stream).  The kernel has several reads
        of a stream in flight and they arrive out of order, so a miss up to a
        window (SLACK at most) behind the stream's last one or past its
        read-ahead belongs to it:
        behind does nothing; inside what was read ahead doubles the window;
        past it moves the stream on with the window as it is.  Moving on
        queues read-ahead of the units from the end of the last read-ahead to
        a window past the miss that are neither present nor in flight, in
        pieces a quarter of the window long (several GETs in flight at once),
        once at least a piece's worth is due.  Other misses are strays and
        leave the stream as it is."""
        cache = self.cache
        with self.lock:
            if self.closing:
                return
            slack = max(2, min(SLACK, self._window) // self.unit)
            if self._window and self._seq_lo - slack <= u0 <= self._ra_end + slack:
                if u1 - 1 <= self._seq_lo:
                    return              # behind or at its last miss (another waiter): no progress
                self._seq_lo = u1 - 1
                grow = u0 <= self._ra_end
            else:
                near = [hi for _lo, hi in self._strays if u0 == hi]
                if not near:
                    self._strays.append((u0, u1))
                    return
                self._strays.clear()    # a new stream (replacing the old one)
                far = SLACK // self.unit
                # one that the old stream's reads outran keeps its window
                keep = self._window // 2 if self._seq_lo - far <= u0 <= self._ra_end + far else 0
                self._seq_lo, self._ra_end, self._window, grow = u1 - 1, u1, keep, True
            if grow:
                self._window = min(cache.readahead, max(2 * self._window, PIECE, self.unit))
            piece = max(1, min(RA_PIECE, max(PIECE, self._window // 4)) // self.unit)
            stop = min(self.presence_units, u1 + max(1, self._window // self.unit))
            start = self._ra_end        # the gap a miss past it left is read ahead too
            if stop < self.presence_units:
                if stop - start < min(piece, max(1, self._window // self.unit // 2)):
                    return              # too little due yet: a later miss asks for more at once
                if stop - start > piece:
                    stop -= (stop - start) % piece      # whole pieces; the rest comes with the next
            todo = []
            for u in range(start, stop):
                if not u0 <= u < u1 and u not in self.inflight and not self.presence.has(u * self.unit, 1):
                    self.inflight[u] = threading.Event()
                    todo.append(u)
            self._ra_end = max(self._ra_end, stop)
            self.readahead_units += len(todo)
        pool = cache._pool("ra")
        for lo, hi in _runs(todo):
            for a, b in self._pieces(lo, hi, piece):
                pool.submit(self._readahead_fill, a, b)

    def _readahead_fill(self, lo, hi):
        with self.lock:
            started = not self.closing
            self._ra_active += started
        try:
            if started:
                self._fill(lo, hi, ahead=True)
        except Exception as e:          # the reader that needs these units fetches them and sees the error
            log.info("cache: %s: read-ahead of bytes %d..%d failed: %s", self.path, lo * self.unit,
                     min(self.size, hi * self.unit), e)
        finally:
            with self.lock:
                for u in range(lo, hi):
                    self.inflight.pop(u).set()
                self._ra_active -= started
                self._ra_idle.notify_all()

    def wait_readahead(self):
        """Wait until no read-ahead of this blob is running (set closing first)."""
        with self.lock:
            while self._ra_active:
                self._ra_idle.wait()

    def _fill(self, u_lo, u_hi, ahead=False):
        start = u_lo * self.unit
        stop = min(self.size, u_hi * self.unit)
        slots, buffer = self.cache.slots_for(self.source), self.cache.buffer
        # read-ahead takes at most half of either budget and gives up when the blob closes
        cancelled = (lambda: self.closing) if ahead else None
        slot = slots.take(1, max(1, slots.total // 2) if ahead else None, cancelled)
        held = 0
        try:
            if slot:
                held = buffer.take(stop - start, max(1, buffer.total // 2) if ahead else None, cancelled)
            if not held:
                return
            try:
                data = self.source.read(start, stop - start)
            finally:
                slots.give(slot)
                slot = 0
            self._store(data, start, stop)
        finally:
            slots.give(slot)
            buffer.give(held)

    def _store(self, data, start, stop):
        if len(data) != stop - start:
            raise ReadError(f"{self.name}: source returned {len(data)} bytes for a read of "
                            f"{stop - start} at {start}")
        for attempt in (0, 1):
            try:
                self.presence.store(self.fd, data, start)    # write, then mark: no eviction between
                break
            except OSError as e:
                if e.errno != errno.ENOSPC or attempt:
                    raise ReadError(f"{self.path}: cannot store {len(data)} bytes at {start}: "
                                    f"{e.strerror}" + (" (cache disk full)" if e.errno == errno.ENOSPC
                                                       else "")) from None
                self.cache.evict_to_water()
        self.dirty = True
        self.presence.touch()
        if self.cache._account(self.name, stop - start):
            self.cache.evict_to_water()
        if time.monotonic() - self.last_persist >= PERSIST_EVERY:
            self.persist()

    def evict(self, offset, length):
        """Forget a range (units touched) and punch it out of the cache file;
        no read of the blob sees it half done.  Returns the bytes freed."""
        lo = offset - offset % self.unit
        hi = min(self.size, -(-(offset + length) // self.unit) * self.unit)
        return self._evict_ranges([(lo, hi)] if hi > lo else [])

    def evict_unpinned(self):
        """Evict every unit that no read in flight has pinned."""
        with self.lock:
            pinned = sorted((lo - lo % self.unit, min(self.size, -(-hi // self.unit) * self.unit))
                            for lo, hi in self.pins.values())
        ranges, pos = [], 0
        for lo, hi in pinned + [(self.size, self.size)]:
            if lo > pos:
                ranges.append((pos, lo))
            pos = max(pos, hi)
        return self._evict_ranges(ranges)

    def _evict_ranges(self, ranges):
        """Evict unit-aligned [lo, hi) ranges: first durably out of the
        presence file, then out of the bitmap and the file."""
        if not ranges or self.fd < 0:
            return 0
        freed = 0
        with self.persist_lock:
            # the presence file must stop claiming the units before they are punched
            bits = bytearray(self.persisted)
            for lo, hi in ranges:
                for u in range(lo // self.unit, -(-hi // self.unit)):
                    bits[u >> 3] &= ~(1 << (u & 7)) & 0xFF
            if bits != self.persisted:
                try:
                    self._write_sidecar(bytes(bits), sync_dir=True)
                except OSError as e:
                    # cannot rewrite it (disk full?): drop it, the blob then restarts empty
                    log.warning("cache: %s: cannot rewrite (%s): removed", self.sidecar, e.strerror)
                    _unlink(self.sidecar)
                    _fsync_dir(self.cache.dir)
                    self.persisted = bytes(len(bits))
            for lo, hi in ranges:
                n, err = self.presence.evict(self.fd, lo, hi - lo)
                freed += n
                if err:
                    # the bits are clear (a refill overwrites the bytes); only the space stays used
                    log.warning("cache: %s: cannot punch bytes %d..%d: %s", self.path, lo, hi, os.strerror(err))
        self.cache._account(self.name, -freed)
        return freed

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
