"""Stress of the blob cache against the real test registry: reader threads
over an uncompressed and a ZFile remote layer, the cache far smaller than
the two blobs so eviction runs all the time, every byte compared with the
model of what the layers hold.  0 wrong bytes and 0 hangs: a watchdog fails
the test, with every thread's stack, if one read takes longer than
READ_TIMEOUT.  It runs TCMU_OBD_STRESS_SECONDS (default 60) seconds and
prints a one-line summary starting "cache stress:" (also recorded as the
test's `cache_stress` property).  cacheSizeGB is a whole number of GiB in
the config, so the cache is built with FileCache directly."""
import os
import random
import sys
import threading
import time
import traceback

from conftest import make_layer
from registry_server import Registry, require
from tcmu_obd.remote.cache import FileCache
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_cached_layer
from tcmu_obd.remote.registry import RegistryClient, RegistrySettings, blob_url

require("docker-registry")
REPO = "obd/cache-stress"
MiB = 1 << 20
VSIZE = 16 * MiB
SECONDS = float(os.environ.get("TCMU_OBD_STRESS_SECONDS", "60"))
READ_TIMEOUT = float(os.environ.get("TCMU_OBD_STRESS_READ_TIMEOUT", "60"))
THREADS = 4


def _layer(tmp, name, rng, **kw):
    """A committed layer and its model (the virtual disk's bytes)."""
    model = bytearray(VSIZE)
    writes = []
    for _ in range(40):
        off = rng.randrange(0, VSIZE // 4096 - 64) * 4096
        data = bytes(rng.getrandbits(8) & 0x3F for _ in range(rng.randrange(1, 64) * 4096))
        writes.append((off, data))
        model[off:off + len(data)] = data
    return make_layer(tmp, name, writes, vsize=VSIZE, **kw), bytes(model)


def _stacks():
    frames = sys._current_frames()
    return "\n".join(f"--- thread {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                     for t in threading.enumerate() if t.ident in frames)


def test_cache_stress(tmp_path, record_property):
    rng = random.Random(int(os.environ.get("TCMU_OBD_STRESS_SEED", "1")))
    raw_path, raw_model = _layer(str(tmp_path), "raw", rng)
    z_path, z_model = _layer(str(tmp_path), "z", rng, use_zfile=True, bs=4096)
    with Registry() as reg:
        lowers = [(reg.push_blob(REPO, open(p, "rb").read()), os.path.getsize(p)) for p in (raw_path, z_path)]
        client = RegistryClient(RegistrySettings())
        blobs_bytes = sum(size for _d, size in lowers)
        # a quarter of the two blobs in 16 KiB units: every few fills evict a blob
        # that someone is reading
        cache = FileCache(str(tmp_path / "cache"), blobs_bytes / 4 / (1 << 30), 16384)
        images = []
        try:
            for digest, size in lowers:
                src = client.open_blob(blob_url(f"{reg.url}/v2/{REPO}/blobs", digest))
                assert src.size == size
                images.append(Image([open_cached_layer(cache.open(digest, size, src), digest)]))
            models = [raw_model, z_model]
            stop = threading.Event()
            busy = {}                   # thread name -> (start, image, offset, length) of its read
            stats = {"bytes": 0, "reads": 0, "wrong": 0, "errors": []}
            lock = threading.Lock()

            def reader(seed):
                r = random.Random(seed)
                me = threading.current_thread().name
                try:
                    while not stop.is_set():
                        k = r.randrange(2)
                        n = r.choice([4096, 65536, r.randrange(1, 2048) * 512])
                        off = r.randrange(0, (VSIZE - n) // 512 + 1) * 512
                        busy[me] = (time.monotonic(), k, off, n)
                        got = images[k].read(off, n)
                        busy.pop(me, None)
                        wrong = sum(a != b for a, b in zip(got, models[k][off:off + n])) \
                            if got != models[k][off:off + n] else 0
                        with lock:
                            stats["bytes"] += n
                            stats["reads"] += 1
                            stats["wrong"] += wrong
                            if wrong:
                                stats["errors"].append(f"image {k}: {wrong} wrong bytes in {n} at {off}")
                except BaseException as e:          # any error fails the test (reported below)
                    with lock:
                        stats["errors"].append(f"{me}: {type(e).__name__}: {e}")
                    stop.set()

            threads = [threading.Thread(target=reader, args=(s,), name=f"reader-{s}", daemon=True)
                       for s in range(THREADS)]
            for t in threads:
                t.start()
            end = time.monotonic() + SECONDS
            hung = None
            while time.monotonic() < end and not stop.is_set() and hung is None:
                time.sleep(0.2)
                now = time.monotonic()
                for name, (t0, k, off, n) in list(busy.items()):
                    if now - t0 > READ_TIMEOUT:
                        hung = f"{name}: read of {n} bytes at {off} from image {k} running {now - t0:.0f}s"
            if hung is not None:
                stacks = _stacks()
                stop.set()
                raise AssertionError(f"hang: {hung}\n{stacks}")
            stop.set()
            for t in threads:
                t.join(READ_TIMEOUT)
                assert not t.is_alive(), f"hang at the end: {t.name}\n{_stacks()}"
            summary = (f"cache stress: {stats['bytes']} bytes read, {stats['reads']} reads, "
                       f"{cache.evictions} evictions, {stats['wrong']} wrong bytes, {THREADS} threads, "
                       f"{SECONDS:g}s, cache {cache.capacity} bytes for {blobs_bytes} bytes of blobs")
            print("\n" + summary)
            record_property("cache_stress", summary)
            assert stats["errors"] == [] and stats["wrong"] == 0, stats["errors"][:10]
            assert stats["reads"] > 0 and cache.evictions > 0
        finally:
            for img in images:
                img.close()
            client.close()
