"""fio through the TCMU block path: tcmu-obd (`tcmu-obd serve` + `attach`,
an uncompressed LSMT layer and an lz4 ZFile layer) vs tcmu-runner (Debian's
qcow handler serving a raw file) vs a kernel loop device over the same raw
bytes, all measured in ONE boot of the tcmuvm guest (tests/vm/run.py).

    python bench/bench_tcmu.py                 # one boot, about 4.5-5 minutes under TCG
    python bench/bench_tcmu.py --rounds 2 --runtime 3

Setup (on the host, project API): one RW layer with a --region-mib MiB
data-bearing region (semi-compressible data, ~1.7x with lz4, written in
shuffled 1 MiB extents) at the start of a --vsize-mib MiB disk, committed
twice as overlaybd-commit does it: uncompressed LSMT, and ZFile lz4 with
4 KiB blocks (`commit -z`).  raw.img is the image exported through
Image.read_into (sparse outside the region, size = the virtual size: the
qcow handler treats a file as raw only when its size equals dev_size).

In the guest: the files are copied to the guest's tmpfs (/tmp), so every
backend reads page-cache-resident bytes; `tcmu-obd serve` is started and
both images attached through tcm_loop (`attach`: max_data_area_mb=4,
cmd_ring_size_mb=1, VPD B0 max transfer 2048 blocks); tcmu-runner is
started with --handler-path holding only handler_qcow.so, and a `user_N/
qcow` backstore over raw.img is exported through tcm_loop with control
hw_max_sectors=2048 (tcmu-runner reports that as its VPD B0 max transfer,
so a 1 MiB read is one command on both; the kernel default of 128 sectors
would split it into 16); `losetup -r` binds raw.img (direct I/O off: tmpfs
has no O_DIRECT, so the loop reads the file's pages).  Every device is
checked against Image.read at sample offsets first.

Timed (fio, libaio, direct=1, inside the region, --runtime s after a 1 s
ramp, --rounds rounds interleaved over the devices): 4 KiB random read at
QD1 and QD32, 1 MiB sequential read at QD4.  Ratio = best-of-rounds IOPS
of tcmu-obd / best of the baseline; "med" = median of per-round ratios.
The CPU column is the serving process's user+system CPU per I/O and the
share of it spent in the kernel (the TCMU ring's copies and wake-ups run in
the server's context; loop is not a process: -).  TCG runs the guest ~10x
slower than native (and its emulated crc32 instruction ~160x: it dominates
the lz4 stack's cost here), so absolute figures are low; the ratios
measured in one boot are what this reports.  bench/README.md has results
and the profile.
"""
import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import (MiB, ROOT, TempDir, commit_rw, env_line, export_raw, fmt, semi_compressible,  # noqa: E402
                     table)
from tcmu_obd.format import zfile  # noqa: E402
from tcmu_obd.image.stack import Image  # noqa: E402
from tcmu_obd.image.layer import open_layer  # noqa: E402
from tcmu_obd.image.rw import RWLayer  # noqa: E402

KiB = 1024
WORKLOADS = [
    # name, fio rw, bs, iodepth
    ("4k rand QD1", "randread", "4k", 1),
    ("4k rand QD32", "randread", "4k", 32),
    ("1M seq QD4", "read", "1m", 4),
]
GOALS = [
    # (workload, subject, baseline, minimum ratio)
    ("4k rand QD32", "tcmu-obd", "tcmu-runner", 1.2),
    ("4k rand QD32", "tcmu-obd lz4", "tcmu-runner", 1.2),
    ("1M seq QD4", "tcmu-obd lz4", "tcmu-runner", 1.0),
    ("4k rand QD32", "tcmu-obd", "loop", 0.35),
    ("4k rand QD32", "tcmu-obd lz4", "loop", 0.35),
]
RUNNER_QCOW = "/usr/lib/x86_64-linux-gnu/tcmu-runner/handler_qcow.so"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ================================================================ host side
def missing_host():
    for tool in ("qemu-system-x86_64", "fio", "tcmu-runner", "losetup"):
        if not shutil.which(tool):
            return f"no {tool} (scripts/setup.sh installs it)"
    if not os.path.exists(RUNNER_QCOW):
        return f"no {RUNNER_QCOW}"
    return None


def build(tmp, vsize, region, seed):
    """layer.lsmt (plain), layer.zfile (lz4, 4 KiB blocks) and raw.img."""
    rng = random.Random(seed)
    dpath, ipath = os.path.join(tmp, "rw.data"), os.path.join(tmp, "rw.index")
    rw = RWLayer.create(dpath, ipath, vsize)
    plain, zf = os.path.join(tmp, "layer.lsmt"), os.path.join(tmp, "layer.zfile")
    try:
        pool = memoryview(semi_compressible(32 * MiB, seed=seed))
        offs = list(range(0, region, MiB))
        rng.shuffle(offs)
        for off in offs:
            s = rng.randrange(0, len(pool) - MiB, 4096)
            rw.write(pool[s:s + MiB], off)
        commit_rw(rw, plain)
        commit_rw(rw, zf, use_zfile=True, algo=zfile.ALGOS["lz4"], bs=4096)
    finally:
        rw.close()
        os.unlink(dpath)
        os.unlink(ipath)
    raw = os.path.join(tmp, "raw.img")
    img = Image([open_layer(plain)])
    try:
        assert img.virtual_size == vsize, img.virtual_size
        export_raw(img, raw, vsize, region)
    finally:
        img.close()
    return plain, zf, raw


def host_main(args):
    why = missing_host()
    if why:
        print(f"bench_tcmu: skipped: {why}")
        return 0
    run = _load("tcmuvm_run", os.path.join(ROOT, "tests", "vm", "run.py"))
    t0 = time.perf_counter()
    vsize, region = args.vsize_mib * MiB, args.region_mib * MiB
    with TempDir("tcmu") as tmp:
        if any(c.isspace() or c == "," for c in tmp):
            raise SystemExit(f"bench_tcmu: temp dir {tmp!r} holds whitespace or a comma "
                             f"(qemu's -fsdev cannot share it); set OBD_BENCH_TMP")
        plain, zf, raw = build(tmp, vsize, region, args.seed)
        t_build = time.perf_counter() - t0
        sizes = {os.path.basename(p): os.path.getsize(p) for p in (plain, zf)}
        print(f"bench_tcmu: built in {t_build:.1f} s: layer.lsmt {sizes['layer.lsmt'] / MiB:.0f} MiB, "
              f"layer.zfile {sizes['layer.zfile'] / MiB:.0f} MiB "
              f"(lz4 {region / sizes['layer.zfile']:.2f}x), raw.img {vsize // MiB} MiB "
              f"({region // MiB} MiB of data); booting the guest", flush=True)
        host_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        cmd = (f"$TCMUVM_PYTHON {os.path.join(HERE, 'bench_tcmu.py')} --guest {tmp} "
               f"--vsize-mib {args.vsize_mib} --region-mib {args.region_mib} "
               f"--runtime {args.runtime} --rounds {args.rounds} --seed {args.seed} "
               f"--workers {args.workers} --inline-max {args.inline_max}"
               + (f" --only {args.only}" if args.only else "")
               + (" --profile" if args.profile else ""))
        t1 = time.perf_counter()
        rc, console = run.run_in_vm(cmd, timeout=args.timeout, mem=args.mem, workdir=tmp,
                                    stream=not args.quiet, smp=args.smp)
        t_vm = time.perf_counter() - t1
        if args.profile:
            os.makedirs(args.profile_dir, exist_ok=True)
            for name in sorted(os.listdir(tmp)):
                if name.startswith("profile-"):
                    shutil.copy(os.path.join(tmp, name), args.profile_dir)
                    print(f"bench_tcmu: py-spy raw stacks: {os.path.join(args.profile_dir, name)}")
        if args.quiet:
            start = console.find("== ")
            print(console[start:] if start >= 0 else console[-5000:])
        print(f"\nhost: load before the boot {host_load}, after "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {env_line()}")
        print(f"bench_tcmu: build {t_build:.1f} s, guest run {t_vm:.1f} s (one boot), exit {rc}")
        return 0 if rc == 0 else 1


# ================================================================ guest side
def sh(cmd, check=True, timeout=600):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode:
        raise SystemExit(f"bench_tcmu: {cmd!r} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def cpu_of(pid):
    """(user, system) seconds of a process and all its threads."""
    if pid is None:
        return 0.0, 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    return int(parts[11]) / hz, int(parts[12]) / hz


def vpd_max_xfer(dev):
    r = sh(["sg_vpd", "-p", "bl", dev], check=False)
    for line in r.stdout.splitlines():
        if "Maximum transfer length" in line:
            return line.split(":", 1)[1].strip()
    return "?"


class Guest:
    def __init__(self, args):
        self.args = args
        self.src = args.guest
        self.dir = "/tmp/bench-tcmu"           # the guest's tmpfs
        os.makedirs(self.dir, exist_ok=True)
        self.vsize, self.region = args.vsize_mib * MiB, args.region_mib * MiB
        self.procs = {}                          # name -> Popen
        self.cleanups = []
        self.devices = []                        # (name, /dev/..., pid of the server or None)
        self.workloads = [w for w in WORKLOADS
                          if not args.only or any(o in w[0] for o in args.only.split(","))]

    # -- set-up -----------------------------------------------------------
    def copy_in(self):
        t0 = time.perf_counter()
        for name in ("layer.lsmt", "layer.zfile"):
            shutil.copyfile(os.path.join(self.src, name), os.path.join(self.dir, name))
        sh(["cp", "--sparse=always", os.path.join(self.src, "raw.img"), self.dir])
        print(f"copied the images into the guest's tmpfs in {time.perf_counter() - t0:.1f} s",
              flush=True)

    def start_obd(self):
        from tcmu_obd.serve import attach as att
        svc = os.path.join(self.dir, "overlaybd.json")
        with open(svc, "w") as f:
            json.dump({"logConfig": {"logPath": os.path.join(self.dir, "obd.log"), "logLevel": 1},
                       "cacheConfig": {"cacheType": "file",
                                       "cacheDir": os.path.join(self.dir, "cache")}}, f)
        pid_file = os.path.join(self.dir, "serve.pid")
        err = open(os.path.join(self.dir, "obd.stderr"), "ab")
        extra = ["--workers", str(self.args.workers)] if self.args.workers else []
        env = dict(os.environ)
        if self.args.inline_max >= 0:
            env["TCMU_OBD_INLINE_MAX"] = str(self.args.inline_max)
        p = subprocess.Popen([sys.executable, "-m", "tcmu_obd.cli.serve", "serve", svc,
                              "--pid-file", pid_file] + extra, stdout=subprocess.DEVNULL,
                             stderr=err, cwd=ROOT, env=env)
        self.procs["tcmu-obd"] = p
        deadline = time.monotonic() + 240
        while not os.path.exists(pid_file):
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_tcmu: tcmu-obd serve did not start: {self.tail('obd.log')}")
            time.sleep(0.1)
        for name, layer, dev_id in (("tcmu-obd", "layer.lsmt", "1"),
                                    ("tcmu-obd lz4", "layer.zfile", "2")):
            cfg = os.path.join(self.dir, f"config-{dev_id}.json")
            with open(cfg, "w") as f:
                json.dump({"lowers": [{"file": os.path.join(self.dir, layer)}],
                           "resultFile": cfg + ".result"}, f)
            dev = att.attach(cfg, dev_id, wait=180, enable_timeout=300)
            self.cleanups.append(lambda i=dev_id: att.detach(i))
            self.devices.append((name, dev, p.pid))

    def start_runner(self):
        """tcmu-runner and its qcow device.  Started AFTER the tcmu-obd devices
        are attached: every libtcmu process answers every device event, and
        one without a handler for the subtype answers -ENOENT; the kernel
        takes the first answer.  So tcmu-runner must not be running while
        `attach` waits for tcmu-obd's answer, and its own device is created
        with nl_reply_supported=-1 (the kernel does not wait for an answer;
        tcmu-runner picks the device up from the event)."""
        conftest = _load("tcmuvm_guest_conftest", os.path.join(ROOT, "tests", "vm", "guest",
                                                               "conftest.py"))
        handlers = os.path.join(self.dir, "runner-handlers")
        logdir = os.path.join(self.dir, "runner-log")
        os.makedirs(handlers)
        os.makedirs(logdir)
        os.symlink(RUNNER_QCOW, os.path.join(handlers, os.path.basename(RUNNER_QCOW)))
        # no -d: its debug log writes a line per command
        p = subprocess.Popen(["tcmu-runner", "--handler-path", handlers, "-l", logdir],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs["tcmu-runner"] = p
        self.cleanups.append(lambda: self.stop("tcmu-runner"))
        log = os.path.join(logdir, "tcmu-runner.log")
        deadline = time.monotonic() + 120
        # without -d there is no "Inotify is watching" line: wait for its netlink group
        while not self._runner_ready(p.pid):
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_tcmu: tcmu-runner did not start: {self.tail(log)}")
            time.sleep(0.1)
        tree = conftest.TargetTree()
        self.cleanups.append(tree.cleanup)
        lun = tree.tcmu_lun("qcow", os.path.join(self.dir, "raw.img"), self.vsize, timeout=180,
                            nl_reply_supported=-1, control=("hw_max_sectors=2048",))
        self.devices.append(("tcmu-runner", lun.dev, p.pid))

    @staticmethod
    def _runner_ready(pid):
        """One of tcmu-runner's netlink sockets is a generic netlink one
        (protocol 16) that has joined a multicast group (TCMU's "config"):
        from then on it receives the kernel's device events."""
        inodes = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            with open("/proc/net/netlink") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            return False
        for line in lines:
            parts = line.split()
            if len(parts) >= 10 and parts[1] == "16" and parts[-1] in inodes and \
                    int(parts[3], 16) != 0:
                return True
        return False

    def start_loop(self):
        dev = sh(["losetup", "-f", "--show", "-r", os.path.join(self.dir, "raw.img")]).stdout.strip()
        self.cleanups.append(lambda: sh(["losetup", "-d", dev], check=False))
        self.devices.append(("loop", dev, None))

    def tail(self, name, n=3000):
        path = name if os.path.isabs(name) else os.path.join(self.dir, name)
        try:
            with open(path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return "(no log)"

    # -- checks -----------------------------------------------------------
    def check(self):
        import mmap
        from tcmu_obd.image.layer import open_layer as ol
        img = Image([ol(os.path.join(self.dir, "layer.lsmt"))])
        rng = random.Random(self.args.seed + 1)
        samples = [(0, 4096), (self.region - MiB, MiB)] + \
            [(rng.randrange(0, self.region - n + 1, 4096), n)
             for n in (4096, 65536, MiB) for _ in range(4)]
        want = [img.read(off, n) for off, n in samples]
        img.close()
        buf = mmap.mmap(-1, MiB)
        for name, dev, _ in self.devices:
            fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                if size != self.vsize:
                    raise SystemExit(f"bench_tcmu: {name} {dev} has {size} bytes, want {self.vsize}")
                for (off, n), w in zip(samples, want):
                    got = os.preadv(fd, [memoryview(buf)[:n]], off)
                    if got != n or buf[:n] != w:
                        raise SystemExit(f"bench_tcmu: {name} {dev}: wrong data at {off}+{n}")
            finally:
                os.close(fd)
        buf.close()

    def limits(self):
        rows = []
        for name, dev, _ in self.devices:
            b = os.path.basename(dev)
            q = f"/sys/block/{b}/queue"
            rd = lambda f: open(f"{q}/{f}").read().strip()   # noqa: E731
            rows.append([name, dev, vpd_max_xfer(dev) if b.startswith("sd") else "-",
                         rd("max_sectors_kb"), rd("max_hw_sectors_kb"), rd("nr_requests")])
        table("transfer limits (a 1 MiB read is one command when max_sectors_kb >= 1024)",
              ["device", "dev", "VPD B0 max transfer", "max_sectors_kb", "max_hw_sectors_kb",
               "nr_requests"], rows)

    # -- fio --------------------------------------------------------------
    def fio(self, dev, rw, bs, qd):
        cmd = ["fio", "--name=b", f"--filename={dev}", "--readonly", "--ioengine=libaio",
               "--direct=1", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--offset=0",
               f"--size={self.region}", "--time_based", f"--runtime={self.args.runtime}",
               "--ramp_time=1", "--norandommap", "--randrepeat=0", "--group_reporting",
               "--output-format=json"]
        r = sh(cmd, timeout=self.args.runtime + 300)
        doc = json.loads(r.stdout[r.stdout.index("{"):])
        job = doc["jobs"][0]
        if job.get("error"):
            raise SystemExit(f"bench_tcmu: fio on {dev}: error {job['error']}")
        rd = job["read"]
        return {"iops": rd["iops"], "bw": rd["bw_bytes"], "lat_us": rd["clat_ns"]["mean"] / 1000,
                "ios": rd["total_ios"], "p99_us": rd["clat_ns"].get("percentile", {}).get(
                    "99.000000", 0) / 1000}

    def measure(self):
        res = {}          # (workload, device) -> [trial dicts]
        for wname, rw, bs, qd in self.workloads:
            for rnd in range(self.args.rounds):
                for name, dev, pid in self.devices:
                    u0, s0 = cpu_of(pid)
                    t0 = time.perf_counter()
                    r = self.fio(dev, rw, bs, qd)
                    wall = time.perf_counter() - t0
                    u1, s1 = cpu_of(pid)
                    # the server's CPU over the whole fio run (1 s ramp included) per I/O
                    # of the timed part, scaled to the timed part
                    scale = 1e6 / max(1, r["ios"]) * self.args.runtime / (self.args.runtime + 1)
                    r["cpu_us"] = ((u1 - u0) + (s1 - s0)) * scale if pid else None
                    r["sys_pct"] = 100 * (s1 - s0) / max(1e-9, (u1 - u0) + (s1 - s0)) \
                        if pid else None
                    r["wall"] = wall
                    res.setdefault((wname, name), []).append(r)
                print(f"  {wname}: round {rnd + 1}/{self.args.rounds} done", flush=True)
        return res

    def report(self, res):
        names = [n for n, _, _ in self.devices]
        for wname, rw, bs, qd in self.workloads:
            rows = []
            best = {n: max(t["iops"] for t in res[(wname, n)]) for n in names}
            for n in names:
                ts = res[(wname, n)]
                b = max(ts, key=lambda t: t["iops"])
                row = [n, fmt(b["iops"]), fmt(b["bw"] / 1e6), fmt(b["lat_us"]), fmt(b["p99_us"]),
                       f"{fmt(b['cpu_us'])} ({b['sys_pct']:.0f}% sys)" if b["cpu_us"] is not None
                       else "-"]
                for base in ("tcmu-runner", "loop"):
                    per = [a["iops"] / c["iops"] for a, c in zip(ts, res[(wname, base)])]
                    row.append(f"{best[n] / best[base]:.2f} (med {statistics.median(per):.2f})")
                rows.append(row)
            table(f"fio {wname}: {rw} bs={bs} iodepth={qd}, libaio, direct=1, over the "
                  f"{self.region // MiB} MiB data region (best of {self.args.rounds} rounds of "
                  f"{self.args.runtime} s)",
                  ["device", "IOPS", "MB/s", "mean lat µs", "p99 µs", "server CPU µs/IO",
                   "/ tcmu-runner", "/ loop"], rows)
        rows = []
        for wname, subj, base, want in GOALS:
            if (wname, subj) not in res:
                continue
            a = max(t["iops"] for t in res[(wname, subj)])
            b = max(t["iops"] for t in res[(wname, base)])
            per = statistics.median(x["iops"] / y["iops"]
                                    for x, y in zip(res[(wname, subj)], res[(wname, base)]))
            rows.append([wname, f"{subj} / {base}", f"{a / b:.2f}", f"{per:.2f}", f">= {want}",
                         "met" if a / b >= want else "MISS"])
        table("goals (ratio of best IOPS; med = median of per-round ratios)",
              ["workload", "ratio", "best", "med", "goal", "result"], rows,
              notes=[f"guest: {os.cpu_count()} vCPU under {os.environ.get('TCMUVM_ACCEL', 'TCG')}"
                     f", kernel {os.uname().release}, load {os.getloadavg()[0]:.2f}"])

    def profile(self):
        """py-spy (--native) of the daemon under the two workloads that matter
        most: 4 KiB QD32 on the plain device, 1 MiB QD4 on the lz4 device.
        Raw collapsed stacks go to the work dir; a summary is printed."""
        pyspy = os.path.join(os.path.dirname(sys.executable), "py-spy")   # not the pyenv shim
        if not os.access(pyspy, os.X_OK):
            pyspy = shutil.which("py-spy")
        if not pyspy:
            print("py-spy is not installed (pip install py-spy): no profile")
            return
        devs = {n: (d, pid) for n, d, pid in self.devices}
        for tag, name, rw, bs, qd in (("qd32-4k", "tcmu-obd", "randread", "4k", 32),
                                      ("qd4-1m-lz4", "tcmu-obd lz4", "read", "1m", 4)):
            dev, pid = devs[name]
            out = os.path.join(self.src, f"profile-{tag}.txt")
            fio = subprocess.Popen(["fio", "--name=p", f"--filename={dev}", "--readonly",
                                    "--ioengine=libaio", "--direct=1", f"--rw={rw}", f"--bs={bs}",
                                    f"--iodepth={qd}", f"--size={self.region}", "--time_based",
                                    "--runtime=25", "--norandommap", "--output-format=terse"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
            r = sh([pyspy, "record", "--pid", str(pid), "--duration", "15", "--rate", "50",
                    "--threads", "--native", "--format", "raw", "--output", out],
                   check=False, timeout=600)
            fio.wait()
            if r.returncode or not os.path.exists(out):
                print(f"py-spy ({tag}): exit {r.returncode}: {r.stderr.strip()[-500:]}")
                continue
            self.summarize(tag, name, out)

    @staticmethod
    def summarize(tag, name, path):
        """Self time by leaf frame.  py-spy --native cannot tell a thread that
        waits in C from a busy one, so samples under pthread_cond_wait (the
        idle workers; their leaf is an unnamed futex address in libc) or
        ending in poll (the ring owner waiting) are counted apart as waiting,
        and the busy percentages are of the other samples."""
        leaf, total, waiting = {}, 0, 0
        with open(path, errors="replace") as f:
            for line in f:
                stack, _, n = line.rstrip("\n").rpartition(" ")
                if not n.isdigit():
                    continue
                n = int(n)
                frames = [fr.split(" (")[0] for fr in stack.split(";")]
                total += n
                if frames[-1] == "poll" or "pthread_cond_wait" in frames:
                    waiting += n
                    continue
                leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        busy = total - waiting
        if not busy:
            return
        top = sorted(leaf.items(), key=lambda kv: -kv[1])[:10]
        table(f"py-spy --native, {name}, {tag}: {busy} busy samples of {total} "
              f"({100 * waiting / total:.0f}% waiting in poll / pthread_cond_wait)",
              ["leaf frame (busy samples)", "% of busy"],
              [[fr[:70], f"{100 * n / busy:.1f}"] for fr, n in top])

    def stop(self, name):
        p = self.procs.get(name)
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def teardown(self):
        """Last in, first out: the loop device, tcmu-runner's LUN and
        backstore, tcmu-runner, the tcmu-obd devices; then the daemon."""
        while self.cleanups:
            try:
                self.cleanups.pop()()
            except Exception as e:      # noqa: BLE001
                print(f"teardown: {e}")
        self.stop("tcmu-obd")


def guest_main(args):
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    g = Guest(args)
    t0 = time.perf_counter()
    try:
        g.copy_in()
        g.start_obd()
        g.start_runner()
        g.start_loop()
        g.check()
        print(f"set-up and checks done in {time.perf_counter() - t0:.1f} s; devices: "
              + ", ".join(f"{n} {d}" for n, d, _ in g.devices), flush=True)
        g.limits()
        t1 = time.perf_counter()
        res = g.measure()
        t_meas = time.perf_counter() - t1
        g.report(res)
        if args.profile:
            g.profile()
        print(f"\nguest: measuring took {t_meas:.1f} s")
    finally:
        g.teardown()
    stats = [line for line in g.tail("obd.log", 20000).splitlines() if "closed" in line]
    for line in stats:
        print("tcmu-obd " + line.split(": ", 1)[-1][:300])
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vsize-mib", type=int, default=1024, help="virtual disk size (default 1024)")
    p.add_argument("--region-mib", type=int, default=256,
                   help="data-bearing region at the start of the disk (default 256)")
    p.add_argument("--runtime", type=int, default=4, help="seconds per fio trial (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workers", type=int, default=0,
                   help="`tcmu-obd serve --workers` (default: the daemon's default)")
    p.add_argument("--inline-max", type=int, default=-1, metavar="BYTES",
                   help="TCMU_OBD_INLINE_MAX for the daemon: reads up to this size are served by "
                        "the ring's own thread (default: the daemon's default)")
    p.add_argument("--only", default="", metavar="SUBSTR[,SUBSTR]",
                   help="run only the workloads whose name holds one of these (e.g. QD32)")
    p.add_argument("--mem", type=int, default=2048, help="guest memory in MiB (default 2048)")
    p.add_argument("--smp", type=int, default=2, help="guest vCPUs (default 2)")
    p.add_argument("--timeout", type=float, default=1500, help="VM timeout in s (default 1500)")
    p.add_argument("--quiet", action="store_true", help="print only the tables, not the console")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, py-spy --native the daemon under 4 KiB QD32 (plain) and "
                        "1 MiB QD4 (lz4) (needs py-spy: pip install py-spy)")
    p.add_argument("--profile-dir", default="/tmp/bench-tcmu-profile",
                   help="where --profile's raw collapsed stacks are copied (default %(default)s)")
    p.add_argument("--guest", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.region_mib > args.vsize_mib or args.region_mib % 4:
        p.error("--region-mib must be a multiple of 4 and at most --vsize-mib")
    return guest_main(args) if args.guest else host_main(args)


if __name__ == "__main__":
    sys.exit(main())
