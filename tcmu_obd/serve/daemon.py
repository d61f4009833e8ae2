"""The TCMU daemon (`tcmu-obd serve`, `overlaybd-tcmu`): start-up as
overlaybd-tcmu does it (docs/runtime.md, Daemon start-up), the netlink loop, logs
and the audit log from the global config (docs/runtime.md, Logs), and a clean stop on SIGTERM/SIGINT.

Start-up: raise RLIMIT_NOFILE; block_netlink=1, reset_netlink=1 (where the
module parameters exist); tcmulib_initialize (which re-adds devices that
already exist: a restarted daemon picks up its devices); force a 4 MiB
netlink receive buffer; block_netlink=0; tcmulib_register() when a system
D-Bus is there (with a GLib main loop thread for its callbacks).  Then the
main thread polls the master fd; libtcmu calls the handler from there.
It does not open images or emulate SCSI (serve.handler, serve.scsi) and
does not attach devices in configfs (serve.attach).
"""
import ctypes
import logging
import logging.handlers
import os
import resource
import select
import signal
import sys
import threading
import time

from tcmu_obd.serve import handler as handler_mod
from tcmu_obd.serve import exporter, snapshot_api
from tcmu_obd import service_config

from tcmu_obd.errors import ObdError
from tcmu_obd.serve.configfs import PARAMS

log = logging.getLogger("tcmu_obd.serve.daemon")

NETLINK_RCVBUF = 4 << 20
NOFILE_WANT = 1048576
DEFAULT_PID_FILE = "/run/tcmu-obd/serve.pid"
# Reads up to this size that arrive alone in the ring are served by the ring's own thread with
# the core's GIL-free read, no hand-off.  Off by default: bench_tcmu under TCG, 128 KiB: 4 KiB
# QD1 0.91x -> 1.13-1.20x of tcmu-runner, but 4 KiB QD32 1.16x -> 1.00x (at depth, commands
# often arrive one at a time and get served one after another).  TCMU_OBD_INLINE_MAX sets it.
INLINE_MAX = int(os.environ.get("TCMU_OBD_INLINE_MAX", 0))
DBUS_SOCKET = "/run/dbus/system_bus_socket"
LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}


class StartError(ObdError):
    """The daemon cannot start here (a kernel module or libtcmu is missing)."""


def set_module_param(name, value):
    """Write a target_core_user parameter if this kernel has it."""
    path = os.path.join(PARAMS, name)
    if not os.path.exists(path):
        return False
    try:
        with open(path, "w") as f:
            f.write(str(value))
        return True
    except OSError as e:
        log.warning("cannot set %s=%s: %s", path, value, e.strerror)
        return False


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (max(hard, NOFILE_WANT), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            continue
    return soft


def setup_logging(cfg, to_stderr=False, verbose=False):
    """Log file and level from logConfig (or the legacy keys), rotated
    logSizeMB x logRotateNum; stderr too when asked or when the file cannot
    be opened."""
    eff = cfg.effective_log
    level = logging.DEBUG if verbose else LEVELS.get(eff.log_level, logging.INFO)
    root = logging.getLogger("tcmu_obd")
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s|%(levelname)s|%(threadName)s|%(name)s: %(message)s")
    handlers = []
    if eff.log_path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(eff.log_path)), exist_ok=True)
            handlers.append(logging.handlers.RotatingFileHandler(
                eff.log_path, maxBytes=max(1, eff.log_size_mb) << 20,
                backupCount=max(0, eff.log_rotate_num)))
        except OSError as e:
            print(f"tcmu-obd: cannot open log {eff.log_path}: {e.strerror}; logging to stderr",
                  file=sys.stderr)
            to_stderr = True
    if to_stderr or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    return eff


class Audit:
    """The audit log (enableAudit / auditPath, 10 MiB x 3): one line per
    device open/close and daemon start/stop, `key=value` fields."""

    def __init__(self, cfg):
        self.logger = None
        if not cfg.enable_audit or not cfg.audit_path:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.audit_path)), exist_ok=True)
            h = logging.handlers.RotatingFileHandler(cfg.audit_path, maxBytes=10 << 20, backupCount=3)
        except OSError as e:
            log.warning("audit log %s disabled: %s", cfg.audit_path, e.strerror)
            return
        h.setFormatter(logging.Formatter("%(asctime)s|AUDIT|%(message)s"))
        self.logger = logging.getLogger("tcmu_obd.audit")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        for old in list(self.logger.handlers):
            self.logger.removeHandler(old)
        self.logger.addHandler(h)

    def __call__(self, event, **fields):
        if self.logger is None:
            return
        text = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        self.logger.info("%s %s", event, text)


def _quote(v):
    s = str(v)
    return f'"{s}"' if (not s or any(c.isspace() for c in s)) else s


class GLibLoop:
    """A GLib main loop in a thread, for libtcmu's D-Bus callbacks."""

    def __init__(self):
        self.glib = ctypes.CDLL("libglib-2.0.so.0")
        self.glib.g_main_loop_new.restype = ctypes.c_void_p
        self.glib.g_main_loop_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.glib.g_main_loop_run.argtypes = [ctypes.c_void_p]
        self.glib.g_main_loop_quit.argtypes = [ctypes.c_void_p]
        self.loop = self.glib.g_main_loop_new(None, 0)
        self.thread = threading.Thread(target=self.glib.g_main_loop_run, args=(self.loop,),
                                       name="glib-dbus", daemon=True)
        self.thread.start()

    def stop(self):
        self.glib.g_main_loop_quit(self.loop)
        self.thread.join(2)


class TCMUService:
    """Be org.kernel.TCMUService1 on the system bus when no tcmu-runner is:
    an ObjectManager at /org/kernel/TCMUService1 with the handler object
    /org/kernel/TCMUService1/overlaybd (ConfigDesc, CheckConfig), which is what
    targetcli lists as `user:overlaybd`.  Built from the GDBus skeleton code
    libtcmu exports.  If tcmu-runner owns the name, `on_taken` runs instead
    (the daemon then registers through it with tcmulib_register)."""

    BUS_NAME = b"org.kernel.TCMUService1"
    ROOT = b"/org/kernel/TCMUService1"

    def __init__(self, subtype, cfg_desc, check, on_taken):
        c = ctypes
        self.gio = gio = c.CDLL("libgio-2.0.so.0")
        self.glib = glib = c.CDLL("libglib-2.0.so.0")
        gobj = c.CDLL("libgobject-2.0.so.0")
        tcmu = c.CDLL("libtcmu.so.2")
        for lib, name, res, args in (
                (gio, "g_dbus_object_manager_server_new", c.c_void_p, [c.c_char_p]),
                (gio, "g_dbus_object_manager_server_export", None, [c.c_void_p, c.c_void_p]),
                (gio, "g_dbus_object_manager_server_set_connection", None, [c.c_void_p, c.c_void_p]),
                (gio, "g_dbus_method_invocation_return_value", None, [c.c_void_p, c.c_void_p]),
                (gio, "g_bus_own_name", c.c_uint, [c.c_int, c.c_char_p, c.c_int, c.c_void_p,
                                                   c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p]),
                (gobj, "g_signal_connect_data", c.c_ulong, [c.c_void_p, c.c_char_p, c.c_void_p,
                                                            c.c_void_p, c.c_void_p, c.c_int]),
                (tcmu, "object_skeleton_new", c.c_void_p, [c.c_char_p]),
                (tcmu, "tcmuservice1_skeleton_new", c.c_void_p, []),
                (tcmu, "tcmuservice1_set_config_desc", None, [c.c_void_p, c.c_char_p]),
                (tcmu, "object_skeleton_set_tcmuservice1", None, [c.c_void_p, c.c_void_p])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        glib.g_variant_new.restype = c.c_void_p
        self.check, self.on_taken, self.owned = check, on_taken, False
        self.mgr = gio.g_dbus_object_manager_server_new(self.ROOT)
        obj = tcmu.object_skeleton_new(self.ROOT + b"/" + subtype.encode())
        self.iface = tcmu.tcmuservice1_skeleton_new()
        tcmu.tcmuservice1_set_config_desc(self.iface, cfg_desc.encode())
        tcmu.object_skeleton_set_tcmuservice1(obj, self.iface)
        gio.g_dbus_object_manager_server_export(self.mgr, obj)
        check_t = c.CFUNCTYPE(c.c_int, c.c_void_p, c.c_void_p, c.c_char_p, c.c_void_p)
        bus_t = c.CFUNCTYPE(None, c.c_void_p, c.c_char_p, c.c_void_p)
        self._cbs = [check_t(self._on_check), bus_t(self._on_bus), bus_t(self._on_name),
                     bus_t(self._on_lost)]
        gobj.g_signal_connect_data(self.iface, b"handle-check-config",
                                   c.cast(self._cbs[0], c.c_void_p), None, None, 0)
        gio.g_bus_own_name(1, self.BUS_NAME, 0, *(c.cast(f, c.c_void_p) for f in self._cbs[1:]),
                           None, None)

    def _on_check(self, iface, invocation, cfgstring, user_data):
        try:
            ok, reason = self.check(cfgstring.decode("utf-8", "replace"))
        except Exception as e:      # noqa: BLE001
            ok, reason = False, str(e)
        v = self.glib.g_variant_new(b"(bs)", ctypes.c_int(1 if ok else 0),
                                    ctypes.c_char_p(reason.encode()))
        self.gio.g_dbus_method_invocation_return_value(invocation, v)
        return 1

    def _on_bus(self, conn, name, user_data):
        self.gio.g_dbus_object_manager_server_set_connection(self.mgr, conn)

    def _on_name(self, conn, name, user_data):
        self.owned = True
        log.info("D-Bus: serving %s (targetcli sees user:overlaybd)", name.decode())

    def _on_lost(self, conn, name, user_data):
        if not self.owned:
            log.info("D-Bus: %s is taken (tcmu-runner?): registering through it",
                     self.BUS_NAME.decode())
            self.on_taken()
        self.owned = False


def check_config(cfgstring):
    """CheckConfig for targetcli: `overlaybd/<config>[;id]` naming a readable config."""
    from tcmu_obd.image import config as config_mod
    try:
        path, _ = handler_mod.parse_cfgstring(cfgstring)
        config_mod.load(path)
    except Exception as e:          # noqa: BLE001
        return False, str(e)
    return True, "OK"


def dbus_available():
    addr = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "")
    if addr.startswith("unix:path="):
        return os.path.exists(addr[len("unix:path="):].split(",")[0])
    return os.path.exists(DBUS_SOCKET)


def missing_module_help():
    from tcmu_obd.serve.doctor import doctor_problems
    lines = ["libtcmu could not start (tcmulib_initialize failed)."]
    for problem, fix in doctor_problems():
        lines.append(f"  failed check: {problem}\n           fix: {fix}")
    if len(lines) == 1:
        lines.append("  run `tcmu-obd doctor` for the checks")
    return "\n".join(lines)


class Daemon:
    def __init__(self, cfg, workers=8, dbus="auto", pid_file=DEFAULT_PID_FILE, write_cache=None,
                 inline_max=INLINE_MAX, metrics=True):
        """metrics: serve exporterConfig's endpoint and serviceConfig's snapshot
        API when they are enabled (a tool's private daemon does not: the
        ports belong to the real daemon)."""
        from tcmu_obd.serve import _tcmu
        self._tcmu = _tcmu
        self.cfg = cfg
        self.workers = workers
        self.dbus = dbus
        self.pid_file = pid_file
        self.audit = Audit(cfg)
        if write_cache is None:
            write_cache = cfg.tcmu_obd.write_cache
        self.handler = handler_mod.OverlaybdHandler(cfg, self.audit, write_cache=write_cache,
                                                    inline_max=inline_max)
        self.ctx = None
        self.pool = None
        self.glib = None
        self.dbus_service = None
        self.metrics = None
        self.want_metrics = metrics
        self.api = None             # serviceConfig's snapshot API, when enabled
        self.want_api = metrics
        self.stopping = False

    def start(self):
        if self.want_api:           # first: a bound port refuses start-up before devices are re-added
            self.api = snapshot_api.start(self.cfg, self.handler.snapshot)
        nofile = raise_nofile()
        self.pool = self._tcmu.Pool(self.workers)
        blocked = set_module_param("block_netlink", 1)
        set_module_param("reset_netlink", 1)
        try:
            self.ctx = self._tcmu.Context(self.handler, handler_mod.SUBTYPE,
                                          handler_mod.HANDLER_NAME, handler_mod.CFG_DESC)
            if not self.ctx.open():
                self.ctx = None
                raise StartError(missing_module_help())
            if not self.ctx.set_rcvbuf(NETLINK_RCVBUF):
                log.warning("could not force the netlink receive buffer to %d bytes", NETLINK_RCVBUF)
        finally:
            if blocked:
                set_module_param("block_netlink", 0)
        want_dbus = self.dbus == "yes" or (self.dbus == "auto" and dbus_available())
        if want_dbus:
            try:
                ctx = self.ctx
                self.dbus_service = TCMUService(handler_mod.SUBTYPE, handler_mod.CFG_DESC,
                                                check_config, ctx.register_dbus)
                self.glib = GLibLoop()
                log.info("D-Bus: exporting subtype %s", handler_mod.SUBTYPE)
            except (OSError, AttributeError) as e:
                log.warning("D-Bus registration skipped: %s", e)
        if self.want_metrics:
            self.metrics = exporter.start(self.cfg, tcmu_devices=self._devices)
        if self.pid_file:
            try:
                os.makedirs(os.path.dirname(self.pid_file), exist_ok=True)
                with open(self.pid_file + ".tmp", "w") as f:
                    f.write(f"{os.getpid()}\n")
                os.replace(self.pid_file + ".tmp", self.pid_file)
            except OSError as e:
                log.warning("cannot write %s: %s", self.pid_file, e.strerror)
        log.info("ready: subtype %s, %d workers, %d devices re-added, RLIMIT_NOFILE %d%s",
                 handler_mod.SUBTYPE, self.workers, len(self.ctx.devices), nofile,
                 ", D-Bus" if self.glib else "")
        self.audit("start", pid=os.getpid(), devices=len(self.ctx.devices))

    def _devices(self):
        ctx = self.ctx
        return dict(ctx.devices) if ctx is not None else {}

    def run(self):
        """Serve until SIGTERM/SIGINT (or stop()); main thread only (signals)."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._loop(rfd)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)

    def run_in_thread(self):
        """Serve the netlink socket on a thread (no signal handling: for a
        daemon private to one tool run, tcmu_obd/serve/blockdev.py).  Returns a
        function that stops the loop and joins the thread."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        t = threading.Thread(target=self._loop, args=(rfd,), name="tcmu-netlink", daemon=True)
        t.start()

        def stop():
            self.stopping = True
            os.write(wfd, b"x")
            t.join()
            os.close(rfd)
            os.close(wfd)
        return stop

    def _loop(self, wake_fd):
        """Poll the netlink socket (device add/remove events) until stopping;
        a byte on wake_fd wakes the poll."""
        p = select.poll()
        p.register(self.ctx.master_fd, select.POLLIN)
        p.register(wake_fd, select.POLLIN)
        while not self.stopping:
            try:
                events = p.poll(1000)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == wake_fd:
                    try:
                        os.read(wake_fd, 4096)
                    except BlockingIOError:
                        pass
                elif ev & select.POLLIN:
                    rc = self.ctx.master_ready()
                    if rc < 0:
                        log.warning("netlink receive failed (%d)", rc)
                elif ev & (select.POLLERR | select.POLLHUP):
                    log.error("netlink socket error; stopping")
                    self.stopping = True

    def _on_signal(self, signum, frame):
        log.info("signal %d: stopping", signum)
        self.stopping = True

    def stop(self):
        n = len(self.ctx.devices) if self.ctx else 0
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self.ctx is not None:
            t0 = time.monotonic()
            self.ctx.close()            # flushes and closes every image
            log.info("closed %d devices in %.1f s", n, time.monotonic() - t0)
            self.ctx = None
        if self.glib is not None:
            self.glib.stop()
        if self.pool is not None:
            self.pool.stop()
        if self.pid_file:
            try:
                os.unlink(self.pid_file)
            except OSError:
                pass
        self.audit("stop", pid=os.getpid(), devices=n)


def serve(config_path=None, workers=8, dbus="auto",
          pid_file=DEFAULT_PID_FILE, log_stderr=False, verbose=False, write_cache=None,
          inline_max=INLINE_MAX):
    """Run the daemon in the foreground; returns the exit status.  config_path
    None: DEFAULT_PATH when it exists, else the built-in defaults; a path
    given must exist."""
    try:
        cfg = service_config.load_given(config_path)
    except Exception as e:          # noqa: BLE001
        print(f"tcmu-obd serve: {e}", file=sys.stderr)
        return 1
    setup_logging(cfg, log_stderr, verbose)
    try:
        d = Daemon(cfg, workers, dbus, pid_file, write_cache, inline_max)
    except ImportError as e:
        print(f"tcmu-obd serve: the TCMU module is not available ({e}); "
              f"install libtcmu2 and rebuild: python setup.py build_ext --inplace", file=sys.stderr)
        return 1
    try:
        d.start()
    except ObdError as e:      # StartError, or the metrics or snapshot API port in use
        log.error("%s", e)
        if not log_stderr:
            print(f"tcmu-obd serve: {e}", file=sys.stderr)
        d.stop()
        return 1
    print(f"tcmu-obd: ready (pid {os.getpid()})", flush=True)
    try:
        d.run()
    finally:
        d.stop()
    log.info("stopped")
    return 0
