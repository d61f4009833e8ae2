"""Background download of an image's remote layers (overlaybd's bk_download,
docs/runtime.md, Background download).

One Downloader per opened image.  After a delay it fetches each remote lower
that has a `dir`, one at a time in config order, into `<dir>/.download`
straight from the registry (not through the cache), checks the whole file
against the layer digest, renames it to `<dir>/overlaybd.commit` and then
switches the layer: the image's core Stack reads that layer from the local
file from then on (Stack.replace_file; the bytes are identical, so the
merged index in memory stays valid).  A file that fails its sha256 is never
renamed and never read.  Downloads are resumable: chunks already in a
partial `.download` (no hole under them) are not fetched again.

It is not a cache (tcmu_obd.remote.cache serves reads while this runs), it
does not open images (tcmu_obd.image.assemble does, and starts this), and it
does not decide its settings (tcmu_obd.service_config.download_settings does).
It lives with the image, not in tcmu_obd.remote: it switches the layers of an
open image.
"""
import collections
import errno
import hashlib
import logging
import os
import random
import threading
import time

from tcmu_obd.image.layer import unwrap
from tcmu_obd.remote import registry
from tcmu_obd.errors import ObdError, ReadError
from tcmu_obd.service_config import DEFAULT_DELAY_EXTRA, DownloadConfig, download_settings

log = logging.getLogger(__name__)

DOWNLOAD_NAME = ".download"
COMMIT_NAME = "overlaybd.commit"
POLL = 0.2                    # seconds: the stop check while waiting, and the pause between items
CHUNK_RETRIES = 2             # each chunk read and write is retried this many times
JOIN_TIMEOUT = 10.0           # stop() waits this long for a registry read in flight

# per-dir in-process lock: two devices never download into the same dir at once
_busy_dirs = set()
_busy_lock = threading.Lock()

QUEUED, WAITING, DOWNLOADING, VERIFYING, DONE, FAILED, STOPPED = (
    "queued", "waiting", "downloading", "verifying", "done", "failed", "stopped")


def _lock_dir(path):
    with _busy_lock:
        if path in _busy_dirs:
            return False
        _busy_dirs.add(path)
        return True


def _unlock_dir(path):
    with _busy_lock:
        _busy_dirs.discard(path)


class _Stopped(Exception):
    """The downloader was stopped while handling an item."""


class _Item:
    """One queued layer and what happened to it."""

    def __init__(self, index, tag, lower, url):
        self.index = index            # position in image.lowers (bottom -> top)
        self.tag = tag                # the core Stack's file tag (top-first)
        self.dir = lower["dir"]
        self.key = os.path.realpath(self.dir)
        self.digest = lower.get("digest", "")
        self.size = lower.get("size") or 0
        self.url = url
        self.state = QUEUED
        self.attempts = 0
        self.force = False            # a digest check failed: the next attempt fetches everything
        self.fetched = 0              # chunks read from the registry (all attempts)
        self.skipped = 0              # chunks found already present (all attempts)
        self.digest_failures = 0
        self.source = None            # "download" or "existing" once switched
        self.error = None
        self.blob = None

    def status(self):
        return {"index": self.index, "tag": self.tag, "dir": self.dir, "digest": self.digest,
                "size": self.size, "state": self.state, "attempts": self.attempts,
                "fetched_chunks": self.fetched, "skipped_chunks": self.skipped,
                "digest_failures": self.digest_failures, "source": self.source,
                "error": self.error}


class Downloader:
    """The background download of one image's remote layers."""

    def __init__(self, image, cfg, remote, settings):
        """image: the opened tcmu_obd.image.stack.Image; cfg: its config.ImageConfig;
        remote: the remote.RemoteContext (its registry client is used, not
        its cache); settings: a service_config.DownloadConfig (the effective
        one, see download_settings) or a JSON-style `download` dict."""
        if isinstance(settings, dict):
            settings = download_settings(settings, None, cfg.path)
        elif not isinstance(settings, DownloadConfig):
            raise TypeError(f"settings: expected DownloadConfig or dict, got {type(settings).__name__}")
        self.image = image
        self.cfg = cfg
        self.remote = remote
        self.settings = settings
        self.delay = max(0, settings.delay)
        self.delay_extra = settings.delay_extra if settings.delay_extra > 0 else DEFAULT_DELAY_EXTRA
        self.rate = settings.max_mbps * (1 << 20) if settings.max_mbps > 0 else 0
        self.try_cnt = max(1, settings.try_cnt)
        self.block_size = settings.block_size
        self.items = []
        lowers = list(cfg.lowers)
        if cfg.raw.get("accelerationLayer") and lowers:
            lowers = lowers[:-1]      # as assemble.open_image: the trace layer is not in the stack
        if len(lowers) != len(image.lowers):
            raise ValueError(f"{cfg.path}: {len(lowers)} lowers in the config, "
                             f"{len(image.lowers)} in the image")
        for i, (lower, layer) in enumerate(zip(lowers, image.lowers)):
            if not lower.get("dir") or getattr(layer, "owner", None) is None:
                continue              # no target dir, or opened from a local file
            url = registry.blob_url(cfg.repo_blob_url, lower.get("digest", ""))
            self.items.append(_Item(i, image.layer_tag(i), lower, url))
        self._stop = threading.Event()
        self._lock = threading.Lock()     # switching vs. stop()
        self._fds = []                    # local files switched in; closed by stop()
        self._thread = None
        self._finished = threading.Event()

    # ------------------------------------------------------------ control
    def start(self):
        """Start the thread (it first waits delay + rand()%delayExtra seconds)."""
        if self._thread is not None:
            return
        wait = self.delay + random.randrange(self.delay_extra)
        self._thread = threading.Thread(target=self._run, args=(wait,), daemon=True,
                                        name=f"obd-download:{os.path.basename(self.cfg.path)}")
        self._thread.start()

    def stop(self):
        """Stop the thread (waits for a registry read in flight, at most
        JOIN_TIMEOUT s) and close the local files switched in.  Call it when
        the image closes: the stack must not be read after this."""
        with self._lock:
            self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(JOIN_TIMEOUT)
            if t.is_alive():
                log.warning("%s: background download still busy after %.0f s; left behind",
                            self.cfg.path, JOIN_TIMEOUT)
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def wait(self, timeout=None):
        """Wait until every item is done or failed (or the thread ended);
        True if it ended within timeout."""
        if self._thread is None:
            return not self.items
        return self._finished.wait(timeout)

    def status(self):
        """Per-layer state, in queue (config) order: a list of dicts."""
        return [item.status() for item in self.items]

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ the thread
    def _sleep(self, seconds):
        """Sleep, waking at least every 200 ms; False if stopped."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return not self._stop.is_set()
            if self._stop.wait(min(POLL, left)):
                return False

    def _run(self, wait):
        try:
            if not self._sleep(wait):
                return
            queue = collections.deque(self.items)
            first = True
            while queue and not self._stop.is_set():
                if not first and not self._sleep(POLL):
                    break
                first = False
                item = queue.popleft()
                if not _lock_dir(item.key):
                    item.state = WAITING          # another device is downloading this dir
                    queue.append(item)
                    continue
                try:
                    ok = self._handle(item)
                except _Stopped:
                    break
                finally:
                    _unlock_dir(item.key)
                if ok:
                    item.state = DONE
                elif item.attempts < self.try_cnt:
                    item.state = QUEUED
                    queue.append(item)
                    log.warning("%s: download of %s failed (%s); retrying later",
                                self.cfg.path, item.dir, item.error)
                else:
                    item.state = FAILED
                    log.error("%s: download of %s failed after %d attempts: %s",
                              self.cfg.path, item.dir, item.attempts, item.error)
        except Exception:              # never let the thread die silently
            log.exception("%s: background download thread failed", self.cfg.path)
        finally:
            for item in self.items:
                if item.state not in (DONE, FAILED):
                    item.state = STOPPED
            self._finished.set()

    def _check_stop(self):
        if self._stop.is_set():
            raise _Stopped()

    def _handle(self, item):
        """One attempt at one layer: True when it now reads from its local file."""
        commit = os.path.join(item.dir, COMMIT_NAME)
        item.attempts += 1
        item.error = None
        try:
            if os.path.exists(commit):
                self._switch(item, commit, "existing")
                return True
            item.state = DOWNLOADING
            tmp = os.path.join(item.dir, DOWNLOAD_NAME)
            self._download(item, tmp)
            item.state = VERIFYING
            got = self._sha256(tmp)
            if got != item.digest.lower():
                item.force = True
                item.digest_failures += 1
                item.error = f"{tmp}: sha256 is {got}, expected {item.digest}"
                return False
            os.rename(tmp, commit)
            _fsync_dir(item.dir)
            self._switch(item, commit, "download")
            return True
        except _Stopped:
            raise
        except OSError as e:
            item.error = f"{e.filename or item.dir}: {e.strerror or e}"
            return False
        except ObdError as e:
            item.error = str(e)
            return False
        except Exception as e:        # a bug: count it as a failed attempt, keep the thread
            log.exception("%s: download of %s", self.cfg.path, item.dir)
            item.error = f"{type(e).__name__}: {e}"
            return False

    def _blob(self, item):
        if item.blob is None:
            blob = self.remote.client.open_blob(item.url)
            if item.size and blob.size != item.size:
                raise ReadError(f"{item.url}: the registry says {blob.size} bytes, the config {item.size}")
            item.size = blob.size
            item.blob = blob
        return item.blob

    def _download(self, item, tmp):
        blob = self._blob(item)
        size = item.size
        os.makedirs(item.dir, exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fresh = os.fstat(fd).st_size != size
            if fresh:
                os.ftruncate(fd, 0)       # a stale file of another size: start empty
                os.ftruncate(fd, size)
            # a file system that does not report holes would make every chunk look present
            force = item.force or (fresh and size > 0 and not _reports_holes(fd))
            bs = self.block_size
            budget_start, spent = time.monotonic(), 0
            for off in range(0, size, bs):
                self._check_stop()
                n = min(bs, size - off)
                if not force and _present(fd, off, n):
                    item.skipped += 1
                    continue
                if self.rate:
                    # pace reads to maxMBps: this chunk may start once the ones before it fit
                    if not self._sleep(budget_start + spent / self.rate - time.monotonic()):
                        raise _Stopped()
                    spent += n
                data = self._read_chunk(blob, off, n)
                self._write_chunk(fd, data, off, tmp)
                item.fetched += 1
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_chunk(self, blob, off, n):
        last = None
        for _ in range(1 + CHUNK_RETRIES):
            self._check_stop()
            try:
                data = blob.read(off, n)
            except ObdError as e:
                last = e
                continue
            if len(data) == n:
                return data
            last = ReadError(f"{blob.url}: {len(data)} bytes for a read of {n} at {off}")
        raise last

    def _write_chunk(self, fd, data, off, path):
        # one pwrite per chunk: a chunk is "present" (no hole under it) only once written whole
        last = None
        for _ in range(1 + CHUNK_RETRIES):
            try:
                n = os.pwrite(fd, data, off)
            except OSError as e:
                last = e
                continue
            if n == len(data):
                return
            last = OSError(errno.EIO, f"short write ({n} of {len(data)} bytes at {off})", path)
        raise last

    def _sha256(self, path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                self._check_stop()
                piece = f.read(1 << 20)
                if not piece:
                    break
                h.update(piece)
        return "sha256:" + h.hexdigest()

    def _switch(self, item, path, source):
        """Serve the layer from `path` from now on."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            backing, _wrappers, _zinfo, _extent = unwrap(fd, path)
            with self._lock:
                if self._stop.is_set():
                    raise _Stopped()
                self.image.stack.replace_file(item.tag, backing)
                self.image.lowers[item.index].backing = backing
                self._fds.append(fd)
        except BaseException:
            os.close(fd)
            raise
        item.source = source
        log.info("%s: layer %d now reads from %s", self.cfg.path, item.index, path)


def _present(fd, off, n):
    """True if [off, off+n) has no hole (it was written before)."""
    try:
        return os.lseek(fd, off, os.SEEK_HOLE) >= off + n
    except OSError:
        return False


def _reports_holes(fd):
    """True if the file system reports the holes of a freshly truncated file."""
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) == 0
    except OSError:
        return False


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
