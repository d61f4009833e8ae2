"""`tcmu-obd mount CONFIG DIR [--loop]` serves an image's virtual disk as
DIR/disk through FUSE (tcmu_obd.serve.fuse), optionally bound to a loop device;
`tcmu-obd umount DIR` tears a running mount down.  Process life, signals and
teardown order live here; the file system itself lives in tcmu_obd.serve.fuse.

Readiness: the line `mount` prints on stdout (the loop device with --loop,
else DIR/disk) means the mount is ready: the FUSE file has answered a stat
with the virtual size and the loop device (if any) is bound.  Without
--foreground, `mount` forks a daemon before opening anything, and exits 0
after printing that line (the daemon has by then let go of the caller's
stdout/stderr; its later messages go to --log FILE, else nowhere); on failure
it exits non-zero with the error on stderr and leaves nothing mounted.  With
--foreground the same line is printed and flushed, and the process serves
until SIGTERM/SIGINT/SIGHUP or until DIR is unmounted.

Teardown (on a signal, and by `umount`): detach the loop device, unmount
the FUSE file, close the image.  Nothing else is unmounted: while a file
system on the loop device is mounted, the daemon's `losetup -d` only sets
autoclear and it keeps serving until that file system is unmounted (then
finishes); `umount` refuses instead and changes nothing.
"""
import argparse
import errno
import logging
import os
import signal
import sys
import threading
import time
import traceback

from tcmu_obd import service_config
from tcmu_obd.serve import exporter, fuse
from tcmu_obd.errors import UsageError
from tcmu_obd.cli.common import open_target, run, subcommand_main

log = logging.getLogger(__name__)


# -- mount ---------------------------------------------------------------------------------------

def cmd_mount(args):
    args.config = os.path.abspath(args.config)
    args.dir = os.path.realpath(args.dir)
    args.log = os.path.abspath(args.log) if args.log else ""
    if not os.path.exists(args.config):
        raise UsageError(f"{args.config}: no such file")
    try:
        os.stat(args.dir)
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):     # a FUSE mount whose daemon died
            raise UsageError(f"{args.dir}: a stale FUSE mount (transport endpoint is not connected); "
                             f"run `tcmu-obd umount {args.dir}` first") from None
        raise
    if not os.path.isdir(args.dir):
        raise UsageError(f"{args.dir}: not a directory")
    m = fuse.mount_at(args.dir)
    if m is not None and m[0] == "fuse." + fuse.SUBTYPE:
        pid = fuse.daemon_pid(m[1])
        if pid and _pid_state(pid) == "alive":
            raise UsageError(f"{args.dir}: already a tcmu-obd mount (daemon {pid})")
        raise UsageError(f"{args.dir}: a stale tcmu-obd mount (its daemon is gone); "
                         f"run `tcmu-obd umount {args.dir}` first")
    fuse.binding()     # fail early (before forking) without mfusepy/libfuse3
    logging.getLogger("fuse").setLevel(logging.INFO)     # mfusepy logs a debug line per errno
    if args.foreground:
        return serve(args, _print_ready)
    return _daemonize(args)


def _print_ready(line):
    print(line, flush=True)


def _daemonize(args):
    """Fork; the child serves in a new session and reports readiness on a
    pipe; the parent prints the line (or the child's exit status) and exits."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        try:
            data = b""
            while True:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                data += chunk
        except KeyboardInterrupt:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            return 130
        finally:
            os.close(r)
        text = data.decode(errors="replace")
        if text.startswith("ok ") and text.endswith("\n"):
            sys.stdout.write(text[3:])
            sys.stdout.flush()
            return 0
        if text:
            sys.stderr.write(text)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code <= 0:
            print(f"error: the daemon {'was killed by signal ' + str(-code) if code else 'exited'} "
                  f"before the mount was ready", file=sys.stderr)
        return code if code > 0 else 1
    # the daemon
    os.close(r)
    os.setsid()

    def ready(line):
        """Let go of the caller's stdio, then send "ok LINE" on the pipe (an
        error here goes down the pipe too: stderr is no longer the caller's)."""
        msg = "error: daemon setup failed\n"
        try:
            os.chdir("/")        # hold no file system busy (paths are absolute by now)
            out = os.open(args.log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            nul = os.open(os.devnull, os.O_RDONLY)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(nul, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            os.close(nul)
            msg = f"ok {line}\n"
        except Exception as e:
            msg = f"error: daemon setup failed: {e!r}\n"
            raise
        finally:
            os.write(w, msg.encode())
            os.close(w)

    rc = 1
    try:
        rc = run(lambda _argv: serve(args, ready), None)
    except BaseException:     # noqa: BLE001 -- the daemon must not die silently
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def serve(args, ready):
    """Open the image, mount, bind the loop device, call ready(line), wait
    for a signal or an outside unmount, tear down.  Returns the exit status."""

    stop = {"sig": None}
    wake = threading.Event()

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if stop["sig"] is None:
            log.info("%s: tearing down", name)
        stop["sig"] = name
        wake.set()

    # Ours, not libfuse's: it only installs its handlers where the disposition is SIG_DFL.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    image = open_target(args.config, args.service_config)
    disk = None
    dev = None
    metrics = None
    clean = True
    ready_sent = [False]
    try:
        disk = fuse.FuseDisk(image, args.dir, direct_io=args.direct_io)
        # before the mount is ready: a port in use fails the mount, it does not go unnoticed
        metrics = exporter.start(service_config.load_given(args.service_config),
                                 fuse_disks=lambda: {disk.path: disk.ops})
        if disk.start(args.timeout, cancel=wake):
            if args.loop and not wake.is_set():
                dev = fuse.loop_attach(disk.path, read_only=not image.writable)
                log.info("%s bound to %s (dio=%s)", dev, disk.path, fuse.loop_dio(dev))
            if not wake.is_set():
                ready(dev or disk.path)
                ready_sent[0] = True
                while not wake.wait(0.5):
                    if not disk.alive():
                        log.warning("%s was unmounted from outside", args.dir)
                        break
        if stop["sig"] is not None and not ready_sent[0]:
            log.warning("%s before the mount was ready: tearing down", stop["sig"])
    finally:
        try:
            if metrics is not None:
                metrics.stop()
            if dev is not None:
                _detach_or_wait(dev, disk)
        finally:
            if disk is not None:
                clean = disk.stop(args.timeout)
            if clean:
                image.close()
            else:    # a lazily detached mount still in use: its threads may still read the image
                log.warning("%s: FUSE loop still running; syncing and exiting without closing", args.dir)
                image.fsync()
    return 0 if ready_sent[0] else 1


def _detach_or_wait(dev, disk):
    """Detach our loop device; while a file system on it is mounted the
    kernel only marks it autoclear, and we keep serving until it lets go."""
    try:
        busy = fuse.loop_busy(dev)
    except OSError:
        busy = False
    msg = ("%s is in use (a mounted file system?): it detaches when released; serving %s until then")
    if busy:
        log.warning(msg, dev, disk.path)
    if fuse.loop_detach(dev, disk.path, timeout=0 if busy else 2.0):
        log.info("%s detached", dev)
        return
    if not busy:
        log.warning(msg, dev, disk.path)
    while fuse.loop_backing(dev) == disk.path and disk.alive():
        time.sleep(0.1)
    log.info("%s released", dev)


# -- umount --------------------------------------------------------------------------------------

def _pid_state(pid):
    """'alive', 'gone' (exited or a zombie) for a pid; None when it is not a tcmu-obd process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return "gone"
    if st[st.rfind(b")") + 2:st.rfind(b")") + 3] == b"Z":
        return "gone"
    return "alive" if b"tcmu" in cmd and b"mount" in cmd else None


def cmd_umount(args):
    d = os.path.realpath(args.dir)
    m = fuse.mount_at(d)
    if m is None:
        raise UsageError(f"{d}: not mounted")
    fstype, source = m
    if fstype != "fuse." + fuse.SUBTYPE:
        raise UsageError(f"{d}: a {fstype} mount, not a tcmu-obd one; leaving it alone")
    path = os.path.join(d, fuse.FILE_NAME)
    devs = fuse.loops_for(path)
    busy = [dev for dev in devs if fuse.loop_busy(dev)]
    if busy:
        raise UsageError(f"{', '.join(busy)} (bound to {path}) in use, e.g. a mounted file system; "
                         f"unmount it first")
    for dev in devs:
        if not fuse.loop_detach(dev, path, timeout=args.timeout):
            raise UsageError(f"{dev}: still bound to {path} after losetup -d (opened by a process?)")
        log.info("%s detached", dev)
    pid = fuse.daemon_pid(source)
    state = _pid_state(pid) if pid else None
    deadline = time.monotonic() + args.timeout
    if state == "alive":
        os.kill(pid, signal.SIGTERM)
        while time.monotonic() < deadline and _pid_state(pid) == "alive":
            time.sleep(0.02)
        if _pid_state(pid) == "alive":
            print(f"warning: daemon {pid} did not exit within {args.timeout:.0f}s", file=sys.stderr)
    if fuse.mount_at(d) == m:      # no daemon (a stale mount), or it did not finish
        ok, msg = fuse.unmount(d)
        if not ok:
            log.warning("%s: %s; detaching it lazily", d, msg)
            ok, msg = fuse.unmount(d, lazy=True)
            if not ok:
                raise UsageError(f"{d}: cannot unmount: {msg}")
    return 0


# -- parser --------------------------------------------------------------------------------------

def add_subcommands(sub, common):
    """Register `mount` and `umount` on an argparse subparsers object."""
    s = sub.add_parser("mount", parents=[common],
                       help="serve an image as DIR/disk through FUSE (and a loop device)",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config", metavar="CONFIG", help="config.v1.json, or a layer file")
    s.add_argument("dir", metavar="DIR", help="an existing directory; the disk appears as DIR/disk")
    s.add_argument("--loop", action="store_true",
                   help="bind DIR/disk to a loop device (direct I/O on) and print its path")
    s.add_argument("--direct-io", action="store_true",
                   help="open DIR/disk with FOPEN_DIRECT_IO (bypass the page cache for every reader)")
    s.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground until SIGTERM/SIGINT (default: daemonize once ready)")
    s.add_argument("--log", metavar="FILE", default="",
                   help="where the daemon's messages go after it is ready (default: nowhere)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the mount (default 30)")
    s.set_defaults(fn=cmd_mount)
    s = sub.add_parser("umount", parents=[common],
                       help="detach the loop device, stop the daemon and unmount DIR")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the loop device and the daemon (default 30)")
    s.set_defaults(fn=cmd_umount)


def main(argv=None):
    subcommand_main("tcmu-obd", "FUSE + loop block path of tcmu-obd.", add_subcommands, argv)


if __name__ == "__main__":
    main()
