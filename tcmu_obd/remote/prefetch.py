"""Prefetching for an opened image (docs/runtime.md, Trace and prefetch): recording a trace
of the layer reads a container start causes, replaying such a trace to warm
the caches, and the "dynamic prefetch" file list, whose files are located in
the image's ext4 file system and read ahead.

start_prefetch() picks the mode from the device config (recordTracePath, or
the trace in the acceleration layer's dir) and returns a handle with stop(),
which Image.close() calls.  Record mode swaps that one image's `stack` for a
recording proxy (every frontend reads through image.stack), so an image that
is not recording pays nothing; replay and file-list mode read from worker
threads and never touch the read path.

The trace file format, mode detection, list parsing and the .lock/.ok
recording protocol live in tcmu_obd.remote.trace; the file system reader in
tcmu_obd.format.ext4.  This module only connects them to an Image.  Nothing here
ever fails the device: a bad trace or list is logged and ignored.
"""
import logging
import os
import threading
import time
from collections import deque

from tcmu_obd import core
from tcmu_obd.format import ext4
from tcmu_obd.remote import trace
from tcmu_obd.errors import FormatError, ObdError
from tcmu_obd.format.lsmt import SECTOR

log = logging.getLogger(__name__)

PIECE = trace.MAX_IO_SIZE           # replay reads at most 1 MiB at a time
DEFAULT_CONCURRENCY = 16            # prefetchConfig.concurrency's default
MAX_WORKERS = 256                   # OS threads per handle, whatever the concurrency
EROFS_MAGIC = 0xE0F5E1E2            # at byte 1024, like ext4's superblock


# ------------------------------------------------------------------ record
def layer_reads(image, offset, length, stack=None):
    """The layer reads an image read of [offset, offset+length) causes:
    [(layer_index, byte offset, byte count)], layer_index = position in
    image.lowers (0 = bottom), offsets in that layer's LSMT view (after tar
    and ZFile).  Pieces the core reads in one go (same layer, adjacent on the
    disk and in the layer) are one entry; holes, zeroed ranges and the
    writable upper layer produce nothing."""
    stack = image.stack if stack is None else stack
    if length <= 0 or stack is None:
        return []
    s = offset // SECTOR
    e = -(-(offset + length) // SECTOR)
    owners = image.file_layer       # tag -> (position in image.lowers, 0 = own file / 1 = warp target)
    out = []
    last_end = None                 # disk sector where the last entry ends
    for lba, n, moff, zeroed, tag in stack.lookup(s, e - s):
        if zeroed or tag >= len(owners) or owners[tag][1]:
            continue                # a TurboOCI target is not in the trace (overlaybd traces the meta file)
        li = owners[tag][0]
        boff, bcnt = moff * SECTOR, n * SECTOR
        if out and last_end == lba and out[-1][0] == li and out[-1][1] + out[-1][2] == boff:
            out[-1][2] += bcnt
        else:
            out.append([li, boff, bcnt])
        last_end = lba + n
    return [tuple(x) for x in out]


class RecordingStack:
    """Stands in for image.stack while a trace is recorded: read_into and
    read go to the real core Stack, then their layer reads are added to the
    recorder; everything else is the real stack's.  Image.read / read_into /
    pread and the TCMU and FUSE frontends all read through image.stack, so
    this one object sees every device read."""

    def __init__(self, inner, handle):
        self._inner = inner
        self._handle = handle

    @property
    def inner(self):
        return self._inner

    def read_into(self, buf, offset):
        with memoryview(buf) as mv:
            n = mv.nbytes
        self._inner.read_into(buf, offset)
        self._handle._note(offset, n)

    def read(self, offset, length):
        data = self._inner.read(offset, length)
        self._handle._note(offset, length)
        return data

    def __getattr__(self, name):
        return getattr(self._inner, name)


class RecordHandle:
    """Record mode: every successful read of the image's stack adds its layer
    reads to a trace.TraceRecorder.  Deleting `<trace>.lock` (polled every
    second) or stop() dumps the trace; the real stack is put back then."""

    mode = trace.MODE_RECORD

    def __init__(self, image, recorder):
        self.image = image
        self.recorder = recorder
        self._inner = image.stack
        self._proxy = None
        self._stopped = False

    @property
    def path(self):
        return self.recorder.path

    @property
    def records(self):
        return self.recorder.records()

    def _note(self, offset, length):
        if self.recorder.stopped:            # the lock was deleted: stop paying for it
            self._uninstall()
            return
        for li, boff, bcnt in layer_reads(self.image, offset, length, self._inner):
            self.recorder.add(li, boff, bcnt)

    def _install(self):
        self._proxy = RecordingStack(self._inner, self)
        self.image.stack = self._proxy

    def _uninstall(self):
        # frontends that captured the proxy keep using it; it only forwards now
        if self._proxy is not None and self.image.stack is self._proxy:
            self.image.stack = self._inner

    def wait(self, timeout=None):
        """True once the trace has been dumped (the lock was deleted)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.recorder.finished:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stats(self):
        return {"mode": self.mode, "records": len(self.recorder), "finished": self.recorder.finished}

    def stop(self):
        """The device closes: put the real stack back and dump the trace
        (unless the lock was deleted before)."""
        if self._stopped:
            return
        self._stopped = True
        self.recorder.stop()
        self._uninstall()
        try:
            self.recorder.close()
        except (OSError, ObdError) as e:
            log.warning("trace %s: cannot write the trace: %s", self.recorder.path, e)


def attach_recorder(image, trace_path, poll_interval=None):
    """Start recording the image's layer reads into trace_path (an existing,
    normally empty file): creates `<trace>.lock`, polls for its deletion
    every poll_interval seconds (1 s), and returns a RecordHandle."""
    recorder = trace.TraceRecorder().start(trace_path)
    handle = RecordHandle(image, recorder)
    handle._install()
    recorder.watch(poll_interval)
    log.info("trace %s: recording", trace_path)
    return handle


# ------------------------------------------------------------------ workers
class PrefetchHandle:
    """Worker threads reading a FIFO of jobs (replay or file-list mode).

    Counters: jobs (queued), done, skipped (out-of-range layer, 'W' op,
    offset past the end), errors (failed reads; in file-list mode also
    entries whose file-system metadata is bad, or an image that is not
    ext4), pieces and bytes_read.  At most MAX_WORKERS threads run, however
    large prefetchConfig.concurrency is (overlaybd's photon threads are
    cheap, OS threads are not)."""

    def __init__(self, mode, concurrency, name):
        self.mode = mode
        self.concurrency = concurrency
        self.name = name
        self.jobs = self.done = self.skipped = self.errors = self.pieces = self.bytes_read = 0
        self.ranges = []            # file-list mode: the device ranges planned
        self._queue = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._threads = []
        self._active = 0
        self._planner = None

    # the job source -------------------------------------------------
    def _count(self, field, n=1):
        with self._lock:
            setattr(self, field, getattr(self, field) + n)

    def _start_workers(self, jobs):
        """Queue jobs (read_fn, offset, count, label) and start the workers."""
        with self._lock:
            self._queue.extend(jobs)
            self.jobs += len(jobs)
            n = min(self.concurrency, MAX_WORKERS, len(self._queue))
            self._active = n
        if n == 0 or self._stop.is_set():
            self._finished.set()
            return
        for i in range(n):
            t = threading.Thread(target=self._worker, name=f"prefetch {self.name} #{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def _worker(self):
        try:
            while not self._stop.is_set():
                with self._lock:
                    if not self._queue:
                        return
                    read_fn, offset, count, label = self._queue.popleft()
                self._run_job(read_fn, offset, count, label)
        finally:
            with self._lock:
                self._active -= 1
                last = self._active == 0
            if last:
                self._finished.set()

    def _run_job(self, read_fn, offset, count, label):
        pos, end = offset, offset + count
        try:
            while pos < end and not self._stop.is_set():
                n = min(PIECE, end - pos)
                data = read_fn(pos, n)
                with self._lock:
                    self.pieces += 1
                    self.bytes_read += len(data)
                if len(data) < n:
                    break                    # the end of the file
                pos += n
        except Exception as e:               # noqa: BLE001 - failures are ignored, as in overlaybd
            log.warning("prefetch %s: reading %s [%d, +%d) failed: %s", self.name, label, pos, end - pos, e)
            self._count("errors")
            return
        self._count("done")

    # the caller's side ------------------------------------------------
    def wait(self, timeout=None):
        """True once every job has been read (or the handle was stopped)."""
        return self._finished.wait(timeout)

    @property
    def finished(self):
        return self._finished.is_set()

    def stats(self):
        with self._lock:
            return {"mode": self.mode, "jobs": self.jobs, "done": self.done, "skipped": self.skipped,
                    "errors": self.errors, "pieces": self.pieces, "bytes_read": self.bytes_read,
                    "finished": self._finished.is_set()}

    def stop(self):
        """Stop after the pieces being read now; joins every thread, so the
        layers can be closed afterwards."""
        self._stop.set()
        me = threading.current_thread()
        if self._planner is not None and self._planner is not me:
            self._planner.join()
        for t in list(self._threads):
            if t is not me:
                t.join()
        self._finished.set()


def replay(image, records, concurrency=DEFAULT_CONCURRENCY, name="trace"):
    """Read every 'R' record from its layer (image.lowers[layer_index].backing,
    in ≤1 MiB pieces) with `concurrency` worker threads taking records in
    order.  Out-of-range layers and offsets are skipped, failed reads
    logged.  Returns a PrefetchHandle (already running)."""
    handle = PrefetchHandle(trace.MODE_REPLAY, max(0, int(concurrency)), name)
    nlow = len(image.lowers)
    jobs = []
    skipped = 0
    for rec in records:
        op, li, count, offset = rec
        if op != trace.OP_READ or not 0 <= li < nlow or count <= 0:
            skipped += 1
            continue
        size = image.lowers[li].backing.size
        if offset >= size:
            skipped += 1
            continue
        jobs.append((_layer_reader(image, li), offset, min(count, size - offset), f"layer {li}"))
    handle.skipped = skipped
    handle._start_workers(jobs)
    return handle


def _layer_reader(image, li):
    def read(offset, length):
        # looked up at read time: a finished background download may swap the backing
        return image.lowers[li].backing.pread(offset, length)
    return read


# ------------------------------------------------------------------ file list
class _Stopped(Exception):
    """The handle was stopped while the planner was still reading the file system."""


def ro_reader(image):
    """(read(offset, length), size) of the merged read-only layers: the image
    itself when it has no upper layer, else a stack of its lowers alone."""
    if image.upper is None:
        return (lambda offset, length: image.read(offset, length)), image.virtual_size
    if not image.lowers:
        return None, 0
    stack = core.Stack(image.stack.backings[:len(image.lower_files)], image.lower_index)
    return stack.read, image.ro_vsize


def file_list_ranges(fs, entries, name="<prefetch list>"):
    """Device byte ranges [(offset, length)] holding the data of the listed
    files, in list order, each range once.  entries: [(path, recursive)]
    from trace.parse_file_list; recursive entries take every regular file
    below the directory.  Returns (ranges, errors): paths that do not
    resolve are skipped silently, file-system errors (FormatError) are
    logged, counted and skipped."""
    out, seen, errors = [], set(), 0
    for path, recursive in entries:
        try:
            if recursive:
                inos = [ino for _p, ino in fs.walk(path)]
            else:
                ino = fs.lookup(path)
                inos = [] if ino is None else [ino]
            if not inos:
                log.debug("prefetch %s: %s: no such file", name, path)
            for ino in inos:
                for rng in fs.inode_extents(ino):
                    if rng[1] > 0 and rng not in seen:
                        seen.add(rng)
                        out.append(rng)
        except FormatError as e:
            log.warning("prefetch %s: %s: %s", name, path, e)
            errors += 1
    return out, errors


def prefetch_files(image, entries, concurrency=DEFAULT_CONCURRENCY, name="<prefetch list>"):
    """File-list mode: in a planner thread, open the merged read-only image
    as ext4, locate the listed files' data (file_list_ranges), then read
    those device ranges (512-aligned, ≤1 MiB pieces) from the merged image
    with `concurrency` workers.  Returns a PrefetchHandle."""
    handle = PrefetchHandle(trace.MODE_FILELIST, max(0, int(concurrency)), name)
    read, size = ro_reader(image)
    if read is None or handle.concurrency == 0:
        handle._finished.set()
        return handle

    def stoppable(offset, length):
        if handle._stop.is_set():
            raise _Stopped()
        return read(offset, length)

    def plan():
        try:
            jobs = []
            try:
                head = stoppable(1024, 1024)
                if len(head) >= 4 and int.from_bytes(head[:4], "little") == EROFS_MAGIC:
                    raise FormatError(name, "file system", "erofs", "erofs images are not supported")
                fs = ext4.Ext4(stoppable, size, f"{name}: image")
                ranges, errors = file_list_ranges(fs, entries, name)
            except (ObdError, OSError) as e:
                log.warning("prefetch %s: cannot read the image's file system: %s", name, e)
                handle._count("errors")
                ranges, errors = [], 0
            handle._count("errors", errors)
            for off, n in ranges:
                lo = off - off % SECTOR
                hi = min(-(-(off + n) // SECTOR) * SECTOR, size)
                if lo < hi:
                    handle.ranges.append((lo, hi - lo))
                    jobs.append((read, lo, hi - lo, "image"))
            handle._start_workers(jobs)
        except _Stopped:
            handle._finished.set()
        except BaseException:
            handle._finished.set()
            raise

    handle._planner = threading.Thread(target=plan, name=f"prefetch {name} planner", daemon=True)
    handle._planner.start()
    return handle


# ------------------------------------------------------------------ mode selection
def _concurrency(service_cfg):
    pc = getattr(service_cfg, "prefetch_config", None)
    return DEFAULT_CONCURRENCY if pc is None else pc.concurrency


def _from_trace_file(image, path, concurrency, allow_record):
    mode = trace.detect_mode(path)
    if mode == trace.MODE_RECORD:
        if not allow_record:
            return None
        return attach_recorder(image, path)
    if mode == trace.MODE_REPLAY:
        try:
            records = trace.read(path)
        except (OSError, ObdError) as e:
            log.warning("trace %s: not replayed: %s", path, e)
            return None
        if concurrency <= 0:
            return None
        log.info("trace %s: replaying %d records with %d workers", path, len(records), concurrency)
        return replay(image, records, concurrency, path)
    if mode == trace.MODE_FILELIST:
        try:
            with open(path, "rb") as f:
                data = f.read(trace.MAX_LIST_SIZE + 1)
            entries = trace.parse_file_list(data, path)
        except (OSError, ObdError) as e:
            log.warning("prefetch list %s: not used: %s", path, e)
            return None
        if concurrency <= 0 or not entries:
            return None
        log.info("prefetch list %s: %d entries", path, len(entries))
        return prefetch_files(image, entries, concurrency, path)
    return None


def start_prefetch(image, cfg, service_cfg=None):
    """Start whatever the prefetch config asks for and return its handle (stop() it before the
    layers close), or None.

    cfg: a config.ImageConfig (or its raw dict).  recordTracePath naming an
    existing file: empty -> record, trace magic -> replay, anything else ->
    file list.  accelerationLayer: `<dir of the last configured lower>/trace`
    is replayed or used as a list; never recorded.  Workers:
    prefetchConfig.concurrency (default 16; <= 0 disables replay)."""
    raw = cfg if isinstance(cfg, dict) else cfg.raw
    lowers = raw.get("lowers") if isinstance(cfg, dict) else cfg.lowers
    concurrency = _concurrency(service_cfg)
    try:
        path = raw.get("recordTracePath") or ""
        if path:
            return _from_trace_file(image, path, concurrency, allow_record=True)
        if raw.get("accelerationLayer") and lowers:
            d = lowers[-1].get("dir") or ""
            if d:
                return _from_trace_file(image, os.path.join(d, "trace"), concurrency, allow_record=False)
    except (OSError, ObdError) as e:
        log.warning("prefetch: not started: %s", e)
    return None
