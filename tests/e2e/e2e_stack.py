"""Helpers of the end-to-end suite (tests/e2e), imported by its conftest and
cases: the busybox image pushed as plain OCI, and Stack, the processes of the
client stack in the guest (tcmu-obd serve, overlaybd-snapshotter, containerd)
with the ctr calls the cases make.  Not a general containerd harness: it
starts exactly what the cases need.
"""
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

CONFIGFS = Path("/sys/kernel/config/target")
NS = "e2e"
CONTAINERD_SOCK = "/run/containerd/containerd.sock"
SNAP_SOCK = "/run/overlaybd-snapshotter/overlaybd.sock"
SNAP_ROOT = "/var/lib/containerd/io.containerd.snapshotter.v1.overlaybd"
SNAP_CONFIG = Path("/etc/overlaybd-snapshotter/config.json")
LOGS = Path("/tmp/e2e-logs")
WRITABLE = "containerd.io/snapshot/overlaybd.writable"


def wait_for(predicate, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:g} s")
        time.sleep(interval)


def sh(*cmd, timeout=120, check=True, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                           f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}")
    return p


# -- the image ------------------------------------------------------------------------------------------

APPLETS = ("sh", "cat", "ls", "sha256sum", "echo", "sleep", "mkdir", "rm", "sync", "test", "true",
           "head", "wc", "dd", "stat", "cp", "touch", "mount", "find")


def _data(seed, size):
    return random.Random(seed).randbytes(size)


# path in the container -> bytes; the second layer's files, read through the device
DATA = {
    "/data/small": b"hello from a tcmu-obd image\n",
    "/data/random-300k": _data(1, 300 * 1024 + 17),
    "/data/random-2m": _data(2, 2 * 1024 * 1024),
    "/data/sub/zeros-1m": bytes(1 << 20),
}
EXPECTED = {p: hashlib.sha256(b).hexdigest() for p, b in DATA.items()}


def _tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data, mode, link in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.mode, ti.linkname = kind, 1700000000, mode, link
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def _has_interp(elf):
    """True when an ELF64 executable names a dynamic loader (a PT_INTERP program header)."""
    import struct
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def busybox_layers():
    """Two tar layers: a busybox rootfs from the host's static busybox, then data + a whiteout."""
    busybox = Path("/bin/busybox").read_bytes()
    if _has_interp(busybox):
        pytest.fail("/bin/busybox is dynamically linked: install busybox-static (scripts/setup.sh)")
    R, D, S = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE
    base = [("bin", D, b"", 0o755, ""), ("bin/busybox", R, busybox, 0o755, "")]
    base += [(f"bin/{a}", S, b"", 0o777, "busybox") for a in APPLETS]
    base += [(d, D, b"", 0o755, "") for d in ("dev", "proc", "sys", "etc", "data", "run")]
    base += [("tmp", D, b"", 0o1777, ""),
             ("etc/passwd", R, b"root:x:0:0:root:/:/bin/sh\n", 0o644, ""),
             ("etc/group", R, b"root:x:0:\n", 0o644, ""),
             ("etc/motd", R, b"removed by the second layer\n", 0o644, "")]
    second = [("etc/.wh.motd", R, b"", 0o644, ""), ("data/sub", D, b"", 0o755, "")]
    second += [(p.lstrip("/"), R, b, 0o644, "") for p, b in DATA.items()]
    return [_tar(base), _tar(second)]


def push_oci_image(reg, repo, tag, layers):
    import gzip
    import requests
    descs = []
    for raw in layers:
        gz = gzip.compress(raw, mtime=0)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": reg.push_blob(repo, gz), "size": len(gz)})
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
                      "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
                      "rootfs": {"type": "layers",
                                 "diff_ids": ["sha256:" + hashlib.sha256(r).hexdigest() for r in layers]}}
                     ).encode()
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": reg.push_blob(repo, cfg), "size": len(cfg)},
         "layers": descs}
    r = requests.put(f"{reg.url}/v2/{repo}/manifests/{tag}", data=json.dumps(m).encode(),
                     headers={"Content-Type": m["mediaType"]}, timeout=60)
    assert r.status_code == 201, r.text
    return f"{reg.host}/{repo}:{tag}"


# -- the stack ------------------------------------------------------------------------------------------

class Stack:
    def __init__(self, bindir):
        self.bin = Path(bindir)
        self.aci = self.bin / "aci"
        self.ctrd = self.bin / "containerd"
        self.procs = {}
        self.reg = None
        self.snap_config = {}
        self.env = dict(os.environ, PATH=f"{self.ctrd}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        LOGS.mkdir(parents=True, exist_ok=True)

    # processes
    def _start(self, name, argv, ready, timeout=120):
        log = open(LOGS / f"{name}.log", "ab")
        p = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=self.env)
        log.close()
        self.procs[name] = p

        def up():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited {p.returncode}:\n{self.log(name)}")
            return ready()
        wait_for(up, timeout, f"{name} ready (log {LOGS}/{name}.log)")
        return p

    def stop(self, name, sig=signal.SIGTERM, timeout=60):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def log(self, name, tail=4000):
        try:
            return (LOGS / f"{name}.log").read_bytes()[-tail:].decode(errors="replace")
        except OSError:
            return ""

    def logs(self):
        return "".join(f"\n--- {n} log (tail) ---\n{self.log(n, 2500)}"
                       for n in ("daemon", "snapshotter", "containerd"))

    def start_daemon(self):
        pid = Path("/run/tcmu-obd/serve.pid")
        if pid.exists():
            pid.unlink()
        self._start("daemon", [sys.executable, "-m", "tcmu_obd", "serve"], pid.exists)

    def restart_daemon(self, sig=signal.SIGTERM):
        self.stop("daemon", sig)
        self.start_daemon()

    def start_snapshotter(self, **config):
        cfg = {"root": SNAP_ROOT, "address": SNAP_SOCK, "verbose": "debug", "rwMode": "overlayfs",
               "mirrorRegistry": [{"host": self.reg.host, "insecure": True}],
               "turboFsType": ["ext4"], "defaultFsType": "ext4"}
        cfg.update(config)
        self.snap_config = cfg
        SNAP_CONFIG.parent.mkdir(parents=True, exist_ok=True)
        SNAP_CONFIG.write_text(json.dumps(cfg, indent=1))
        if os.path.exists(SNAP_SOCK):
            os.unlink(SNAP_SOCK)
        self._start("snapshotter", [self.aci / "overlaybd-snapshotter"], lambda: os.path.exists(SNAP_SOCK))

    def restart_snapshotter(self, **config):
        self.stop("snapshotter")
        self.start_snapshotter(**config)

    def start_containerd(self):
        cfg = Path("/etc/containerd/config.toml")
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"""version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
                    "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.sandbox.controller.v1.shim",
                    "io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs"]
[grpc]
  address = "{CONTAINERD_SOCK}"
[proxy_plugins.overlaybd]
  type = "snapshot"
  address = "{SNAP_SOCK}"
""")
        self._start("containerd", [self.ctrd / "containerd", "--config", cfg, "--log-level", "info"],
                    lambda: os.path.exists(CONTAINERD_SOCK) and
                    sh(self.aci / "ctr", "--address", CONTAINERD_SOCK, "version", check=False,
                       timeout=60).returncode == 0, timeout=180)

    # clients
    def ctr(self, *args, timeout=300, check=True):
        p = sh(self.aci / "ctr", "--address", CONTAINERD_SOCK, "-n", NS, *args, timeout=timeout,
               check=False, env=self.env)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(map(str, args))} exited {p.returncode}\n"
                                 f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}" + self.logs())
        return p

    def rpull(self, ref):
        return self.ctr("rpull", "--plain-http", ref, timeout=600)

    def run(self, image, name, script, labels=(), timeout=300):
        """ctr run --rm of `sh -c script`; returns its stdout."""
        args = ["run", "--rm", "--snapshotter", "overlaybd"]
        for lab in labels:
            args += ["--snapshotter-label", lab]
        return self.ctr(*args, image, name, "sh", "-c", script, timeout=timeout).stdout

    def devices(self):
        """The overlaybd TCMU backstores in configfs: ['user_<hba>/dev_<id>', ...]."""
        core = CONFIGFS / "core"
        out = []
        for hba in sorted(core.glob("user_*")):
            out += [f"{hba.name}/{d.name}" for d in sorted(hba.iterdir()) if d.is_dir()]
        return out

    def loopbacks(self):
        lb = CONFIGFS / "loopback"
        return sorted(p.name for p in lb.glob("naa.*") if p.is_dir()) if lb.is_dir() else []

    def close(self):
        for name in ("containerd", "snapshotter", "daemon"):
            self.stop(name)
        if self.reg is not None:
            self.reg.__exit__(None, None, None)


def guest_setup():
    sh("ip", "link", "set", "lo", "up")
    cg = Path("/sys/fs/cgroup")
    if not (cg / "cgroup.controllers").exists():
        cg.mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "cgroup2", "none", cg)
    for d, size in (("/var/lib/containerd", "900m"),):
        Path(d).mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(d):
            sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d)
    for d in ("/run/containerd", "/run/overlaybd-snapshotter", "/run/lock"):
        Path(d).mkdir(parents=True, exist_ok=True)
    # /dev/fuse: tcmu-obd's ext4 TurboOCI tools (overlaybd-create --turboOCI --mkfs, turboOCI-apply)
    # write through the kernel's ext4 on a FUSE + loop device while `tcmu-obd serve` runs (the
    # daemon does not serve a warp upper).  A systemd host has the node from boot (kmod
    # static-nodes; opening it loads the module); the guest's init has no such step.
    if not os.path.exists("/dev/fuse"):
        sh("modprobe", "fuse")


def checksum_script(paths=None):
    return "sha256sum " + " ".join(sorted(paths or EXPECTED))


def parse_sums(text):
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            out[parts[1]] = parts[0]
    return out
