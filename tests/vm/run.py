#!/usr/bin/env python3
"""Run one shell command line in a fresh throw-away qemu guest.

    python tests/vm/run.py [--timeout 300] [--mem 1024] [--workdir DIR] [--dmesg FILE] -- CMD...

The guest boots the Debian kernel that tests/vm/prepare.py caches (it runs
prepare first; that is quick when the cache is current).  It sees the host's
/ read-only under an overlay (writes go to a tmpfs and vanish), tmpfs /tmp and
/run, configfs, the kernel's modules at /lib/modules, and the work dir (default:
the repository root) shared read-write at the same path, which is its cwd.
PATH, HOME and TCMUVM_PYTHON (this interpreter's sys.executable) come from the
host, as do all TCMUVM_* variables; TCMUVM_GUEST=1 is set.

The guest console streams to stdout; the exit status is the command's, or 255
when the guest died or timed out (qemu is killed then).  TCMU_OBD_VM_TIMEOUT
(or the older VM_TIMEOUT) sets the default time limit.  progress_report()
reads the guest test suite's progress lines from a console log.

From Python:  rc, console = run_in_vm("cmd", timeout=300, mem=1024)
"""
import argparse
import codecs
import ctypes
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
QEMU = "qemu-system-x86_64"
GUEST_DIED = 255
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYENV_VERSION", "PYENV_ROOT")


def _load_prepare():
    mod = sys.modules.get("tcmuvm_prepare")
    if mod is None:
        spec = importlib.util.spec_from_file_location("tcmuvm_prepare", HERE / "prepare.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["tcmuvm_prepare"] = mod
        spec.loader.exec_module(mod)
    return mod


def choose_accel():
    """TCG unless a real KVM (kvm_intel / kvm_amd) is loaded.  TCMUVM_ACCEL overrides.

    A /dev/kvm alone is not enough: on these machines it is kvm_pvm, under which a
    stock Debian kernel hangs or qemu aborts (tests/vm/README.md)."""
    forced = os.environ.get("TCMUVM_ACCEL")
    if forced:
        return forced
    real = any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))
    return "kvm" if real and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def _sq(value):
    return shlex.quote(str(value))


def _check_path(p, what):
    if any(c.isspace() for c in str(p)) or "," in str(p):
        raise ValueError(f"{what} {p!r}: qemu's -fsdev and the guest need a path without "
                         "spaces or commas")


try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:
    _libc = None


def _pdeathsig():
    """In the qemu child: die with the parent, so no guest outlives a killed test."""
    if _libc is not None:
        _libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)     # PR_SET_PDEATHSIG


def _sweep_stale_ctl_dirs():
    """Remove control dirs left by runs that were SIGKILLed (their owner is gone)."""
    for d in Path(tempfile.gettempdir()).glob("tcmuvm-*"):
        try:
            pid = int((d / "owner").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            pass


def qemu_command(stamp, ctl, workdir, mem, smp=2, accel=None):
    accel = accel or choose_accel()
    d = Path(stamp["dir"])
    if accel == "tcg":
        accel_args = ["-accel", "tcg,tb-size=256", "-cpu", "max"]
    else:
        accel_args = ["-accel", accel, "-cpu", "host"]
    return [
        QEMU, *accel_args, "-smp", str(smp), "-m", str(mem), "-M", "pc",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(d / "vmlinux"), "-initrd", str(d / "initrd.gz"),
        # TCMUVM_APPEND: extra kernel parameters, for debugging (e.g. "loglevel=7")
        "-append", " ".join(["console=ttyS0 quiet panic=-1 8250.nr_uarts=1",
                             os.environ.get("TCMUVM_APPEND", "")]).strip(),
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=work,path={workdir},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=work,mount_tag=work",
        "-fsdev", f"local,id=ctl,path={ctl},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=ctl,mount_tag=ctl",
    ]


def _write_ctl(ctl, stamp, workdir, cmd, env):
    kroot = Path(stamp["dir"]) / "kroot"
    _check_path(kroot, "the cache dir")
    (ctl / "vars").write_text(f"TCMUVM_WORK={_sq(workdir)}\nTCMUVM_KROOT={_sq(kroot)}\n")
    guest_env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    guest_env.update({k: v for k, v in os.environ.items() if k.startswith("TCMUVM_")})
    guest_env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    guest_env.setdefault("HOME", "/root")
    guest_env.update({
        "TCMUVM_PYTHON": sys.executable,
        "TCMUVM_GUEST": "1",
        "TCMUVM_WORK": str(workdir),
        "TCMUVM_KVER": stamp["kver"],
        "PYTHONDONTWRITEBYTECODE": "1",   # keep the shared work dir free of guest-written .pyc
        "TERM": "dumb",
    })
    guest_env.update(env or {})
    (ctl / "env").write_text("".join(f"export {k}={_sq(v)}\n" for k, v in guest_env.items()))
    (ctl / "cmd").write_text(cmd + "\n")


def _pump(pipe, out, chunks):
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        data = os.read(pipe.fileno(), 65536)
        text = dec.decode(data, final=not data).replace("\r", "")
        if text:
            chunks.append(text)
            if out is not None:
                try:
                    out.write(text)
                    out.flush()
                except (OSError, ValueError):
                    out = None           # keep draining the pipe, or qemu would block
        if not data:
            return


def run_in_vm(cmd, timeout=300, mem=1024, workdir=None, env=None, stream=True, smp=2,
              prepare=True, dmesg=None):
    """Boot a guest, run the shell command line `cmd` in it, return (rc, console_text).

    rc is the command's exit status, or 255 when the guest died or did not finish
    within `timeout` seconds (qemu is killed).  `workdir` (default: the repo root)
    is shared read-write at the same path and is the cwd; `env` adds variables;
    `stream` is True (sys.stdout), a file object, or False/None (collect only);
    `dmesg`, a host path, receives the guest's kernel log when the command ends.
    """
    prep = _load_prepare()
    stamp = prep.ensure(quiet=True) if prepare else prep._current(prep.cache_dir())
    if stamp is None:
        raise RuntimeError("no prepared tcmuvm cache: run tests/vm/prepare.py")
    if shutil.which(QEMU) is None:
        raise FileNotFoundError(f"{QEMU} is missing: run scripts/setup.sh (package qemu-system-x86)")
    workdir = Path(workdir or REPO).resolve()
    _check_path(workdir, "the work dir")
    out = sys.stdout if stream is True else (stream or None)
    _sweep_stale_ctl_dirs()
    ctl = Path(tempfile.mkdtemp(prefix="tcmuvm-"))
    (ctl / "owner").write_text(str(os.getpid()))
    chunks = []
    proc = None
    try:
        _check_path(ctl, "the temp dir")
        _write_ctl(ctl, stamp, workdir, cmd, env)
        args = qemu_command(stamp, ctl, workdir, mem, smp)
        t0 = time.monotonic()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        reader = threading.Thread(target=_pump, args=(proc.stdout, out, chunks), daemon=True)
        reader.start()
        try:
            qrc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            qrc = None
            proc.kill()
            proc.wait()
        reader.join(10)
        elapsed = time.monotonic() - t0
        exit_file = ctl / "exit"
        if qrc is None:
            rc, why = GUEST_DIED, f"timed out after {timeout} s; qemu killed"
        elif exit_file.exists():
            try:
                rc, why = int(exit_file.read_text().strip()), None
            except ValueError:
                rc, why = GUEST_DIED, "unreadable exit status"
        else:
            rc, why = GUEST_DIED, f"the guest died without an exit status (qemu exit {qrc})"
        if dmesg and (ctl / "dmesg").exists():
            shutil.copyfile(ctl / "dmesg", dmesg)
        note = f"tcmuvm: {why or f'guest command exited {rc}'} ({elapsed:.1f} s)\n"
        if why and (ctl / "dmesg").exists():
            note = "tcmuvm: guest dmesg tail:\n" + "".join(
                (ctl / "dmesg").read_text(errors="replace").splitlines(True)[-30:]) + note
        chunks.append(note)
        if out is not None:
            out.write(note)
            out.flush()
        return rc, "".join(chunks)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stdout:
            proc.stdout.close()
        shutil.rmtree(ctl, ignore_errors=True)


# anywhere in a line: kernel messages on the same console may precede one
PROGRESS = re.compile(r"@@tcmuvm (start|done) (\S+)(?: ([0-9.]+)s)?[ \t]*$", re.M)


def progress_report(console):
    """What the guest's progress lines (tests/vm/guest/conftest.py) say: the
    test that started and never finished, if any, and each finished test's
    duration, slowest first.  '' when the console has no progress lines."""
    running, done = [], []
    for kind, nodeid, secs in PROGRESS.findall(console):
        if kind == "start":
            running.append(nodeid)
        else:
            done.append((float(secs), nodeid))
            if nodeid in running:
                running.remove(nodeid)
    if not running and not done:
        return ""
    lines = [f"running when the guest stopped: {', '.join(running)}" if running
             else "no test was running when the guest stopped"]
    if done:
        lines.append(f"{len(done)} finished, {sum(s for s, _ in done):.1f} s in all (slowest first):")
        lines += [f"  {s:7.1f} s  {n}" for s, n in sorted(done, key=lambda d: -d[0])]
    return "\n".join(lines)


def timeout_from_env(default):
    """Seconds from TCMU_OBD_VM_TIMEOUT (or the older VM_TIMEOUT), else
    `default`; a value that is not a positive number is an error naming it."""
    for name in ("TCMU_OBD_VM_TIMEOUT", "VM_TIMEOUT"):
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise ValueError(f"{name}={text!r}: the guest time limit must be a positive number of seconds")
        return value
    return default


def main(argv=None):
    ap = argparse.ArgumentParser(
        usage="%(prog)s [--timeout S] [--mem MB] [--workdir DIR] -- CMD...",
        description="Run a shell command line in a fresh qemu guest (see tests/vm/README.md).")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds before qemu is killed (default $TCMU_OBD_VM_TIMEOUT or 300)")
    ap.add_argument("--mem", type=int, default=1024, help="guest memory in MiB (default 1024)")
    ap.add_argument("--smp", type=int, default=2, help="vCPUs (default 2)")
    ap.add_argument("--workdir", help="shared read-write and the cwd (default: the repo root)")
    ap.add_argument("--dmesg", metavar="FILE", help="save the guest's kernel log here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the shell command line")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    cmd = cmd[0] if len(cmd) == 1 else " ".join(cmd)
    if args.timeout is None:
        try:
            args.timeout = timeout_from_env(300)
        except ValueError as e:
            ap.error(str(e))

    def on_term(signum, frame):
        raise SystemExit(GUEST_DIED)      # unwinds run_in_vm's finally: qemu is killed
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        rc, _ = run_in_vm(cmd, timeout=args.timeout, mem=args.mem, workdir=args.workdir,
                          smp=args.smp, dmesg=args.dmesg)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"tcmuvm: {e}", file=sys.stderr)
        return GUEST_DIED
    except KeyboardInterrupt:
        return GUEST_DIED
    return rc


if __name__ == "__main__":
    sys.exit(main())
