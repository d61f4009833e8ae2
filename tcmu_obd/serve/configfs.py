"""The kernel's target configfs and the TCMU module's sysfs, as the overlaybd
snapshotter drives them: where things are (one definition of each path), the
names of devices (backstore dirs, loopback WWNs), and the small file helpers
the fabrics share.  Not a fabric (serve.attach for tcm_loop, serve.iscsi) and
not the checks (serve.doctor)."""
import os
import re
import subprocess

CONFIGFS = "/sys/kernel/config"
TARGET = CONFIGFS + "/target"
CORE = TARGET + "/core"
LOOPBACK = TARGET + "/loopback"
ISCSI = TARGET + "/iscsi"
PARAMS = "/sys/module/target_core_user/parameters"
HBA = 999999999
NAA_PREFIX = 199
MAX_DATA_AREA_MB = 4
# The mailbox + command ring is vzalloc'ed (unswappable) per device, 8 MiB by
# default on kernels >= 5.12: 64 devices would pin 512 MiB.  With at most
# MAX_DATA_AREA_MB of data in flight, 1 MiB holds far more entries than can be
# outstanding (a 4 KiB read takes about 64 bytes, a 1 MiB one at most 4 KiB).
# Older kernels ignore the option.  0 = leave the kernel's default.
CMD_RING_SIZE_MB = 1
CMD_TIME_OUT = 2147483              # MaxInt32 / 1000, as the snapshotter writes
ENABLE_RETRIES, ENABLE_SLEEP = 100, 0.05
DEV_ID = re.compile(r"^[0-9]{1,13}$")




def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def read_text(path, default=""):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def listdir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def naa_for(dev_id, prefix=NAA_PREFIX):
    """The snapshotter's loopback WWN: naa.<prefix:03d><id zero-padded to 13>."""
    return f"naa.{prefix:03d}{'0' * (13 - len(dev_id))}{dev_id}"


def core_dir(dev_id, hba=HBA):
    return f"{CORE}/user_{hba}/dev_{dev_id}"


def load_module(name):
    """modprobe name unless it is loaded; a failure is left to the checks
    (doctor_checks, iscsi_checks) to explain."""
    if os.path.isdir(f"/sys/module/{name}"):
        return
    try:
        subprocess.run(["modprobe", "-q", name], capture_output=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pass


def daemon_pids():
    """Processes that look like an overlaybd TCMU daemon (ours or overlaybd's)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        stat = read_text(f"/proc/{pid}/stat")
        if ") Z" in stat:
            continue
        if is_daemon_argv(argv):
            pids.append(int(pid))
    return pids


def is_daemon_argv(argv):
    """argv (bytes) of overlaybd-tcmu, or of tcmu-obd's daemon however started:
    `tcmu-obd serve`, `python -m tcmu_obd serve`, `python -m tcmu_obd.cli.serve`."""
    text = b" ".join(argv)
    if b"overlaybd-tcmu" in text or b"tcmu_obd.cli.serve" in text:
        return True
    for i, arg in enumerate(argv):
        if arg == b"-m" and argv[i + 1:i + 2] == [b"tcmu_obd"]:
            rest = argv[i + 2:]
        elif os.path.basename(arg) == b"tcmu-obd":
            rest = argv[i + 1:]
        else:
            continue
        sub = next((a for a in rest if a and not a.startswith(b"-")), None)
        return sub == b"serve"
    return False


def proc_running(comm):
    for pid in os.listdir("/proc"):
        if pid.isdigit() and read_text(f"/proc/{pid}/comm") == comm and \
                ") Z" not in read_text(f"/proc/{pid}/stat"):
            return True
    return False


def mounted_fs(fstype, where):
    for line in read_text("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == fstype and parts[1] == where:
            return True
    return False


def unlink_luns(lun, errors):
    if os.path.isdir(lun):
        for name in os.listdir(lun):
            p = f"{lun}/{name}"
            if os.path.islink(p):
                try:
                    os.unlink(p)
                except OSError as e:
                    errors.append(f"{p}: {e.strerror}")


def rmdirs(dirs, errors):
    for d in dirs:
        if os.path.isdir(d):
            try:
                os.rmdir(d)
            except OSError as e:
                errors.append(f"{d}: {e.strerror}")
