"""Block devices for the tools that need the kernel's ext4 on an image
(overlaybd-apply, overlaybd-create --mkfs, `tcmu-obd run`): the image as a
SCSI disk through TCMU where the kernel has it, else as a FUSE file behind a
direct-I/O loop device.  `image_device()` picks the frontend and undoes it.

TCMU, in the order tried:
- a TCMU daemon is running (`tcmu-obd serve` or overlaybd-tcmu): the config
  is attached through configfs (tcmu_obd/serve/attach.py) and that daemon opens and
  serves it; this process never opens the image (one writer per upper).
- none is running: a daemon private to this process (daemon.Daemon, its
  netlink loop on a thread, no D-Bus, no pid file) serves exactly the configs
  it was given and refuses any other device (a device it served would die
  with this process).  Two such processes would race to answer the kernel's
  events, so a lock file serializes them.
The TCMU frontend is used when `tcmu_problems()` is empty (root, the
modules, configfs, libtcmu, the _tcmu extension); TCMU_OBD_FRONTEND=fuse or
=tcmu (or the frontend argument) forces one.

Not here: the daemon itself (daemon.py, handler.py), configfs writing
(attach.py), the FUSE server (fuse.py), mkfs and mounting (apply.py).
"""
import contextlib
import fcntl
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass

from tcmu_obd.errors import ObdError, UsageError

log = logging.getLogger(__name__)

FRONTEND_ENV = "TCMU_OBD_FRONTEND"
FRONTENDS = ("auto", "tcmu", "fuse")
PRIVATE_LOCK = "/run/tcmu-obd/private-daemon.lock"
PRIVATE_WORKERS = 4
# A private daemon never restarts: if its tool is killed (SIGKILL), the kernel's
# commands to the device must fail after a while rather than wait "forever" (the
# 2^31/1000 s a daemon-served device gets, so that a restart finds them pending).
# Longer than the remote read deadline (tcmuObd.readDeadlineSec, 60 s).
PRIVATE_CMD_TIME_OUT = 180
MODULES = ("target_core_user", "tcm_loop")


class DeviceError(ObdError):
    """The image could not be made into a block device."""


@dataclass
class Device:
    path: str               # /dev/sdX or /dev/loopN
    frontend: str           # "tcmu" or "fuse"
    served_by: str          # who serves the image: "this process" or "the daemon (pid N)"
    in_process: bool        # True when this process opened the image (opener was called)


# -- which frontend -------------------------------------------------------------------------------

def _mount_configfs():
    from tcmu_obd.serve.configfs import CONFIGFS, mounted_fs
    if os.path.isdir(CONFIGFS) and not mounted_fs("configfs", CONFIGFS):
        subprocess.run(["mount", "-t", "configfs", "none", CONFIGFS], capture_output=True,
                       timeout=60, check=False)


def tcmu_problems(setup=True):
    """What stops the TCMU frontend here, as [(problem, fix)]; empty when it
    can be used.  setup=True first tries what a root user may do (modprobe,
    mount configfs)."""
    from tcmu_obd.serve import configfs, doctor
    if os.geteuid() != 0:
        return [("not root", "run as root (configfs, /dev/uio* and module parameters need it)")]
    if setup and os.path.isdir("/lib/modules/" + os.uname().release):
        for m in MODULES:
            configfs.load_module(m)
        _mount_configfs()
    return doctor.doctor_problems()


def fuse_problems(tools=("losetup", "mount", "umount", "mkfs.ext4", "fusermount3")):
    """What stops the FUSE + loop frontend here, as [(problem, fix)]; empty
    when it can be used."""
    import shutil
    from tcmu_obd.serve import fuse
    out = []
    if os.geteuid() != 0:
        out.append(("not root", "run as root (FUSE mounts, loop devices and ext4 mounts need it)"))
    if not os.path.exists("/dev/fuse"):
        out.append(("no /dev/fuse", "modprobe fuse (in a container: --device /dev/fuse)"))
    if not os.path.exists("/dev/loop-control"):
        out.append(("no /dev/loop-control", "modprobe loop (in a container: --privileged)"))
    for tool in tools:
        if not shutil.which(tool):
            out.append((f"no {tool}", "apt-get install fuse3 mount e2fsprogs"))
    try:
        fuse.binding()
    except Exception as e:      # noqa: BLE001 - whatever stops libfuse3 from loading
        out.append((f"libfuse3: {e}", "apt-get install libfuse3-3"))
    return out


def choose_frontend(frontend=None):
    """'tcmu' or 'fuse' for frontend 'auto'/'tcmu'/'fuse' (None: $TCMU_OBD_FRONTEND or auto).
    A forced 'tcmu' that cannot work raises DeviceError with the failed checks."""
    want = frontend or os.environ.get(FRONTEND_ENV) or "auto"
    if want not in FRONTENDS:
        raise UsageError(f"frontend {want!r} (from {'the argument' if frontend else FRONTEND_ENV}): "
                         f"must be one of {', '.join(FRONTENDS)}")
    if want != "fuse":
        problems = tcmu_problems()
        if not problems:
            return "tcmu"
        if want == "tcmu":
            raise DeviceError("the TCMU frontend cannot work here: " + _listed(problems))
        log.debug("TCMU not usable (%s); using FUSE + loop", problems[0][0])
    fuse_missing = fuse_problems()
    if fuse_missing:
        raise DeviceError("no block device frontend works here: FUSE + loop: " + _listed(fuse_missing)
                          + ("" if want == "fuse" else "; TCMU: " + _listed(problems)))
    return "fuse"


def _listed(problems):
    return "; ".join(f"{p} (fix: {f})" for p, f in problems)


def size_of(dev):
    """Size in bytes of a block device."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


# -- FUSE + loop ----------------------------------------------------------------------------------

@contextlib.contextmanager
def fuse_loop(image, workdir, read_only=False):
    """`image` served by FUSE under workdir and bound to a loop device;
    yields the device path.  Teardown: loop device, then FUSE."""
    from tcmu_obd.serve import fuse
    fdir = os.path.join(workdir, "fuse")
    os.makedirs(fdir, exist_ok=True)
    disk = fuse.FuseDisk(image, fdir)
    cwd = os.getcwd()
    try:
        try:
            disk.start()
        finally:
            os.chdir(cwd)        # libfuse's fuse_daemonize() does chdir("/"), even in the foreground
        dev = fuse.loop_attach(disk.path, read_only=read_only or not image.writable)
        try:
            yield dev
        finally:
            if not fuse.loop_detach(dev, disk.path):
                log.warning("%s: still bound to %s", dev, disk.path)
    finally:
        disk.stop()


@contextlib.contextmanager
def raw_loop(path, read_only=False):
    """A plain image file on a (buffered) loop device."""
    from tcmu_obd.serve import fuse
    dev = fuse.loop_attach(os.path.abspath(path), read_only=read_only, direct_io=False)
    try:
        yield dev
    finally:
        fuse.loop_detach(dev, os.path.abspath(path))


# -- TCMU -----------------------------------------------------------------------------------------

class PrivateDaemon:
    """A TCMU daemon inside this process serving only the configs given to
    serve(); its netlink loop runs on a thread.  Use as a context manager."""

    def __init__(self, service_cfg):
        from tcmu_obd import service_config
        self.svc = service_cfg or service_config.load(None)
        self.openers = {}
        self._lock = threading.Lock()
        self._lock_fd = None
        self.daemon = None
        self._stop_loop = None

    def _take_lock(self):
        os.makedirs(os.path.dirname(PRIVATE_LOCK), exist_ok=True)
        fd = os.open(PRIVATE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another tool run's private TCMU daemon (%s); "
                        "`tcmu-obd serve` lets them share one", PRIVATE_LOCK)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd

    def __enter__(self):
        from tcmu_obd.serve import daemon
        self._take_lock()
        try:
            d = daemon.Daemon(self.svc, workers=PRIVATE_WORKERS, dbus="no", pid_file=None,
                              metrics=False)
            d.handler.open_image = self._open
            d.start()
            self.daemon = d
            self._stop_loop = d.run_in_thread()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _open(self, path, _svc):
        with self._lock:
            opener = self.openers.get(path)
        if opener is None:
            raise DeviceError(f"{path}: this TCMU daemon is private to pid {os.getpid()} "
                              f"(an apply/run) and serves only its own configs; "
                              f"start `tcmu-obd serve` for other devices")
        return opener()

    def serve(self, config_path, opener):
        """Serve config_path with the image opener() returns when the kernel adds it."""
        with self._lock:
            self.openers[os.path.abspath(config_path)] = opener

    def __exit__(self, *exc):
        if self._stop_loop is not None:
            self._stop_loop()
            self._stop_loop = None
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


@contextlib.contextmanager
def _tcmu_device(config_path, opener, service_cfg, wait):
    from tcmu_obd.serve import attach, configfs
    config_path = os.path.abspath(config_path)
    pids = configfs.daemon_pids()
    with contextlib.ExitStack() as stack:
        timeout = configfs.CMD_TIME_OUT
        if pids:
            served_by, in_process = f"the running TCMU daemon (pid {pids[0]})", False
        else:
            private = stack.enter_context(PrivateDaemon(service_cfg))
            private.serve(config_path, opener)
            served_by, in_process = "a TCMU daemon in this process", True
            timeout = PRIVATE_CMD_TIME_OUT
        dev = attach.attach(config_path, check_daemon=False, wait=wait, cmd_time_out=timeout)
        try:
            yield Device(dev, "tcmu", served_by, in_process)
        finally:
            # the kernel's remove event makes the daemon flush and close the image
            t0 = time.monotonic()
            attach.detach(dev)
            log.debug("%s detached in %.2f s", dev, time.monotonic() - t0)


@contextlib.contextmanager
def image_device(config_path, opener, workdir, read_only=False, frontend=None, service_cfg=None,
                 wait=60.0):
    """The image of config_path as a block device; yields a Device.

    opener() opens the image (an Image) when this process serves it: called
    for FUSE, and for TCMU by the private daemon; never when a running daemon
    serves the config.  The image is flushed and closed at the end either way."""
    kind = choose_frontend(frontend)
    if kind == "tcmu":
        with _tcmu_device(config_path, opener, service_cfg, wait) as d:
            yield d
        return
    image = opener()
    try:
        with fuse_loop(image, workdir, read_only) as dev:
            yield Device(dev, "fuse", "this process (FUSE + loop)", True)
    finally:
        try:
            image.fsync()
        finally:
            image.close()
