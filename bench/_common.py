"""Helpers shared by the benchmarks: temp dirs, test data, commit through the
project's own API, interleaved timing, and table printing.

Every figure a benchmark reports is a ratio to a baseline measured in the
same process, in the same interleaved rounds (baseline, subject, baseline,
subject, ...), and the median of the rounds is what is reported.
"""
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tcmu_obd.image import commit
from tcmu_obd import core  # noqa: E402

# A/B runs of a candidate build of the core: OBD_BENCH_CORE=<importable module
# with the _lsmt API> swaps it in for tcmu_obd.core's classes before anything
# is built (every caller reaches them as core.X at call time).
if os.environ.get("OBD_BENCH_CORE"):
    import importlib

    _alt = importlib.import_module(os.environ["OBD_BENCH_CORE"])
    for _name in ("Index", "RawBacking", "Stack", "ZFileBacking", "compress_blocks", "crc32c", "merge"):
        setattr(core, _name, getattr(_alt, _name))
    core.IMPLEMENTATION = f"{core.IMPLEMENTATION} -> {_alt.__name__} (OBD_BENCH_CORE)"
from tcmu_obd.image.output import Output  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


# ---------------------------------------------------------------- temp dirs
class TempDir:
    """A temp directory removed on exit (also on error or Ctrl-C).
    $OBD_BENCH_TMP chooses where it is created (default: the system tmp)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix=f"obd-bench-{self.name}-", dir=os.environ.get("OBD_BENCH_TMP"))
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


def rm(*paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def warm(path, chunk=8 * MiB):
    """Read a whole file once so it sits in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(chunk)
        off = 0
        while True:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
    finally:
        os.close(fd)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- data
def semi_compressible(size, seed=1, piece=256, block=4096, p_repeat=0.45):
    """`size` bytes that lz4 and zstd compress about 1.5-1.8x with 4 KiB (or
    larger) blocks: each `block` is made of `piece`-byte pieces that are either
    fresh random bytes or a copy of an earlier piece of the same block."""
    rng = random.Random(seed)
    pool = rng.randbytes(16 * MiB)
    out = bytearray(size)
    per = block // piece
    pos = 0
    rand = rng.random
    rint = rng.randrange
    while pos < size:
        for k in range(per):
            at = pos + k * piece
            if at >= size:
                break
            if k and rand() < p_repeat:
                j = pos + rint(k) * piece
                out[at:at + piece] = out[j:j + piece]
            else:
                s = rint(len(pool) - piece)
                out[at:at + piece] = pool[s:s + piece]
        pos += block
    return out


# ---------------------------------------------------------------- commit
def commit_rw(rw, out_path, use_zfile=False, algo=1, bs=4096, threads=1):
    """Commit an open RWLayer exactly as overlaybd-commit does (Output: file
    [-> ZFile], fsync at close).  Returns the committed file's size."""
    files = [rw.backing]
    header = commit.layer_info(files)
    out = Output(out_path, True, use_zfile, False, algo, bs, threads, overwrite_header=use_zfile)
    try:
        commit.compact(rw.index.records(), files, out, header)
        out.close()
    finally:
        out.abort()
    return os.path.getsize(out_path)


# ---------------------------------------------------------------- timing
def interleaved(cases, rounds):
    """cases: list of (name, fn) where fn() runs one timed trial and returns
    its elapsed seconds (or None to time the whole call).  Runs the cases in
    turn, `rounds` times, and returns {name: [seconds per round]}.

    The machine is shared (2 cores, other jobs running), so trials are kept
    short and interleaved: a burst of interference hits one round of every
    case rather than all rounds of one case."""
    times = {name: [] for name, _ in cases}
    for _ in range(rounds):
        for name, fn in cases:
            t0 = time.perf_counter()
            r = fn()
            t = time.perf_counter() - t0 if r is None else r
            times[name].append(t)
    return times


def best(samples):
    return min(samples)


def ratio(base, case):
    """(best-of ratio, median of per-round ratios) of baseline time over case
    time: above 1 means the case is faster than the baseline."""
    r_best = min(base) / min(case)
    r_med = statistics.median(b / c for b, c in zip(base, case))
    return r_best, r_med


def spread(samples):
    """Relative spread (max-min)/min of a list of timings, as a %."""
    m = min(samples)
    return 100.0 * (max(samples) - m) / m if m else 0.0


# ---------------------------------------------------------------- tables
def table(title, header, rows, notes=()):
    """Print a fixed-width table; cells are preformatted strings."""
    cols = list(zip(*([header] + rows))) if rows else [[h] for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = "  ".join("-" * w for w in widths)
    print()
    print(f"== {title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print(line)
    for r in rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for n in notes:
        print(f"  * {n}")
    sys.stdout.flush()


def fmt(x, digits=1):
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def env_line():
    import platform
    CRC_HW = "?"
    try:
        import importlib
        CRC_HW = importlib.import_module(os.environ.get("OBD_BENCH_CORE") or "tcmu_obd.core._lsmt").CRC_HW
    except (ImportError, AttributeError):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    built = ""
    try:
        import importlib
        mod = importlib.import_module(os.environ.get("OBD_BENCH_CORE") or "tcmu_obd.core._lsmt")
        built = ", core built " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(mod.__file__)))
    except (ImportError, OSError):
        pass
    return (f"python {platform.python_version()}, core={core.IMPLEMENTATION}, "
            f"cpus={os.cpu_count()}, crc32c_hw={CRC_HW}, load average {load}{built}")


def export_raw(img, path, vsize, region):
    """The first `region` bytes of an Image into a raw file of `vsize` bytes
    (sparse after the region), synced: the same bytes as a flat baseline."""
    buf = bytearray(4 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, vsize)
        for off in range(0, region, len(buf)):
            img.read_into(buf, off)
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tar(fileobj, entries, mtime=1700000000):
    """entries: [(name, bytes)] -> an uncompressed PAX tar on fileobj, each
    parent directory added (0755) before its first file (0644)."""
    import io
    import tarfile
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as t:
        dirs = set()
        for name, data in entries:
            d = os.path.dirname(name)
            if d and d not in dirs:
                dirs.add(d)
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
                t.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, mtime
            t.addfile(ti, io.BytesIO(data))

