"""Attach and detach overlaybd devices through configfs, as the overlaybd
snapshotter does (spec/image.md §4.3): a `user` backstore handled by the
daemon (`tcmu-obd serve`), exported through the tcm_loop fabric as a local
SCSI disk (/dev/sdX).  Also `list` and `doctor` (what is missing, and how to
fix it).  This module only writes configfs/sysfs; it never talks to libtcmu.

With iscsi=True (`tcmu-obd attach --iscsi`) the backstore is exported as an
iSCSI target on 127.0.0.1 instead (iscsi_target_mod: target/iscsi/<iqn>/tpgt_1
with np 127.0.0.1:<port>, lun_0, generate_node_acls=1 (demo mode) and
authentication=0), and the kernel initiator logs in to it through open-iscsi's
`iscsiadm` (discovery sendtargets + login; iscsid must be running and the
loopback interface up).  Detach logs out, deletes the node record, then
removes the target in reverse order.
"""
import ctypes
import errno
import glob
import json
import os
import re
import shutil
import subprocess
import time

from tcmu_obd.image import config
from tcmu_obd.errors import ObdError, UsageError

CONFIGFS = "/sys/kernel/config"
TARGET = CONFIGFS + "/target"
CORE = TARGET + "/core"
LOOPBACK = TARGET + "/loopback"
ISCSI = TARGET + "/iscsi"
ISCSI_IQN_PREFIX = "iqn.2024-01.io.github.tcmu-obd:dev-"
ISCSI_ADDR = "127.0.0.1"
ISCSI_PORT = 3260
ISCSI_PORT_TRIES = 16               # auto port: 3260, 3261, ... when one is taken
ISCSI_SESSIONS = "/sys/class/iscsi_session"
ISCSIADM_TIMEOUT = 120
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
_ID = re.compile(r"^[0-9]{1,13}$")


class AttachError(ObdError):
    pass


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _read(path, default=""):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


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


def _daemon_pids():
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
        text = b" ".join(argv)
        stat = _read(f"/proc/{pid}/stat")
        if ") Z" in stat:
            continue
        if b"overlaybd-tcmu" in text or b"tcmu_obd.cli.serve" in text or \
                (b"tcmu-obd" in text and b"serve" in argv):
            pids.append(int(pid))
    return pids


def _free_id(hba=HBA):
    used = set()
    try:
        for name in os.listdir(f"{CORE}/user_{hba}"):
            if name.startswith("dev_"):
                used.add(name[4:])
    except FileNotFoundError:
        pass
    n = 1
    while str(n) in used:
        n += 1
    return str(n)


def _enable(dev_dir, timeout):
    """echo 1 > enable: blocks until the daemon has opened the image.  EAGAIN
    is retried (100 x 50 ms).  A write still blocked after `timeout` means no
    handler answers: unstick it with block_netlink/reset_netlink."""
    import threading
    result = {}

    def go():
        for _ in range(ENABLE_RETRIES):
            try:
                _write(f"{dev_dir}/enable", "1")
                result["ok"] = True
                return
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    result["err"] = e
                    return
                time.sleep(ENABLE_SLEEP)
        result["err"] = OSError(errno.EAGAIN, "enable kept failing with EAGAIN")

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        # no reply from any handler: fail the pending netlink command
        for name, val in (("block_netlink", 1), ("reset_netlink", 1), ("block_netlink", 0)):
            try:
                _write(f"{PARAMS}/{name}", str(val))
            except OSError:
                pass
        t.join(10)
        raise AttachError(f"{dev_dir}/enable got no answer in {timeout:.0f} s: is the daemon "
                          f"(tcmu-obd serve) running? See `tcmu-obd doctor`")
    if "err" in result:
        raise result["err"]


def _scsi_disk(naa, wait):
    """tpgt_1/address (h:c:t) -> /sys/class/scsi_device/<h:c:t>:0/device/block/sdX."""
    deadline = time.monotonic() + wait
    while True:
        addr = _read(f"{LOOPBACK}/{naa}/tpgt_1/address")
        if addr:
            bdir = f"/sys/class/scsi_device/{addr}:0/device/block"
            try:
                names = os.listdir(bdir)
            except OSError:
                names = []
            # sd lists the disk before it has read the capacity and registered the queue
            if names and _read(f"/sys/block/{names[0]}/size", "0") not in ("", "0") and \
                    os.path.isdir(f"/sys/block/{names[0]}/queue") and \
                    os.path.exists(f"/dev/{names[0]}"):
                return names[0]
        if time.monotonic() > deadline:
            raise AttachError(f"no block device appeared for {naa} (address {addr or '?'}) "
                              f"within {wait:.0f} s")
        time.sleep(0.01 if time.monotonic() + 1 < deadline else 0.1)


def attach(config_path, dev_id=None, iscsi=False, hba=HBA, wait=60.0, enable_timeout=120.0,
           cmd_time_out=CMD_TIME_OUT, check_daemon=True, iscsi_port=None,
           cmd_ring_size_mb=CMD_RING_SIZE_MB):
    """Attach an image config; returns '/dev/sdX'.  iscsi: export it over
    iSCSI on 127.0.0.1 (port iscsi_port, default the first free one from
    3260) and log in with open-iscsi instead of using tcm_loop."""
    if iscsi:
        load_module("iscsi_target_mod")     # iscsi_checks() below says what is missing
        problems = [f"{what}: {fix}" for ok, what, fix in iscsi_checks() if not ok]
        if problems:
            raise AttachError("--iscsi cannot work here: " + "; ".join(problems))
    config_path = os.path.abspath(config_path)
    cfg = config.load(config_path)              # fail early on a bad config
    if not os.path.isdir(CORE):
        raise AttachError(f"{CORE} is missing: configfs or target_core_mod is not there; "
                          f"see `tcmu-obd doctor`")
    if check_daemon and not _daemon_pids():
        raise AttachError("no overlaybd TCMU daemon is running (start `tcmu-obd serve` first); "
                          "an enable with no handler blocks in the kernel")
    explicit = dev_id is not None
    dev_id = str(dev_id) if explicit else _free_id(hba)
    if not _ID.match(dev_id):
        raise UsageError(f"--dev-id {dev_id!r}: must be 1 to 13 decimal digits")
    ddir = core_dir(dev_id, hba)
    if os.path.exists(ddir):
        raise AttachError(f"{ddir} exists already: dev id {dev_id} is in use "
                          f"(`tcmu-obd detach {dev_id}` first)")
    naa = naa_for(dev_id)
    os.makedirs(ddir)
    try:
        cfgstr = f"overlaybd/{config_path}" + (f";{dev_id}" if explicit else "")
        _write(f"{ddir}/control", f"dev_config={cfgstr}")
        _write(f"{ddir}/control", f"max_data_area_mb={MAX_DATA_AREA_MB}")
        if cmd_ring_size_mb:
            try:
                _write(f"{ddir}/control", f"cmd_ring_size_mb={cmd_ring_size_mb}")
            except OSError:
                pass
        if cfg.result_file:
            try:
                os.unlink(cfg.result_file)
            except OSError:
                pass
        try:
            _enable(ddir, enable_timeout)
        except OSError as e:
            why = _read(cfg.result_file) if cfg.result_file else ""
            hint = ""
            if e.errno == errno.ENOENT and _proc_running("tcmu-runner"):
                # every libtcmu process answers every device event; one with no
                # handler for the subtype answers -ENOENT, and the first answer wins
                hint = ("; tcmu-runner is running too and may have refused the device "
                        "before tcmu-obd answered (stop it, or retry)")
            raise AttachError(f"enabling {ddir} failed: {e.strerror or e}"
                              + (f"; {cfg.result_file}: {why}" if why else
                                 "; the daemon log has the reason") + hint) from None
        _write(f"{ddir}/attrib/cmd_time_out", str(cmd_time_out))
        if iscsi:
            sd = _iscsi_export(dev_id, ddir, iscsi_port, wait)
        else:
            tpg = f"{LOOPBACK}/{naa}/tpgt_1"
            os.makedirs(f"{tpg}/lun/lun_0", exist_ok=True)
            _write(f"{tpg}/nexus", naa)
            os.symlink(ddir, f"{tpg}/lun/lun_0/dev_{dev_id}")
            sd = _scsi_disk(naa, wait)
        try:
            _write(f"/sys/block/{sd}/device/timeout", str(cmd_time_out))
        except OSError:
            pass
        dev = f"/dev/{sd}"
        deadline = time.monotonic() + wait
        while not os.path.exists(dev) and time.monotonic() < deadline:
            time.sleep(0.01)
        return dev
    except BaseException:
        _teardown(dev_id, hba)
        raise


def _unlink_luns(lun, errors):
    if os.path.isdir(lun):
        for name in os.listdir(lun):
            p = f"{lun}/{name}"
            if os.path.islink(p):
                try:
                    os.unlink(p)
                except OSError as e:
                    errors.append(f"{p}: {e.strerror}")


def _rmdirs(dirs, errors):
    for d in dirs:
        if os.path.isdir(d):
            try:
                os.rmdir(d)
            except OSError as e:
                errors.append(f"{d}: {e.strerror}")


def _teardown(dev_id, hba=HBA):
    """Remove whatever exists of a device, in reverse order: for iSCSI the
    initiator session and node record first, then the target; then the
    loopback fabric; the core backstore last."""
    errors = []
    iqn = iqn_for(dev_id)
    if os.path.isdir(f"{ISCSI}/{iqn}"):
        errors += _iscsi_teardown(iqn)
    naa = naa_for(dev_id)
    tpg = f"{LOOPBACK}/{naa}/tpgt_1"
    lun = f"{tpg}/lun/lun_0"
    _unlink_luns(lun, errors)
    _rmdirs((lun, tpg, f"{LOOPBACK}/{naa}", core_dir(dev_id, hba)), errors)
    return errors


# ------------------------------------------------------------------ iSCSI
def iqn_for(dev_id):
    """The target name of an iSCSI-exported device: <prefix><dev id>."""
    return f"{ISCSI_IQN_PREFIX}{dev_id}"


def _iscsiadm(*args, check=True):
    try:
        r = subprocess.run(["iscsiadm", *args], capture_output=True, text=True,
                           timeout=ISCSIADM_TIMEOUT)
    except FileNotFoundError:
        raise AttachError("iscsiadm is missing: apt-get install open-iscsi") from None
    except subprocess.TimeoutExpired:
        raise AttachError(f"iscsiadm {' '.join(args)} did not finish in "
                          f"{ISCSIADM_TIMEOUT} s") from None
    if check and r.returncode:
        raise AttachError(f"iscsiadm {' '.join(args)} exited {r.returncode}: "
                          f"{(r.stderr or r.stdout).strip()[-1000:]}")
    return r


def _proc_running(comm):
    for pid in os.listdir("/proc"):
        if pid.isdigit() and _read(f"/proc/{pid}/comm") == comm and \
                ") Z" not in _read(f"/proc/{pid}/stat"):
            return True
    return False


def _lo_up():
    try:
        return int(_read("/sys/class/net/lo/flags", "0"), 16) & 0x1 == 1     # IFF_UP
    except ValueError:
        return False


def iscsi_checks():
    """[(ok, what, how to fix)] for `attach --iscsi`."""
    checks = []
    have_mod = os.path.isdir("/sys/module/iscsi_target_mod")
    checks.append((have_mod or os.path.isdir(ISCSI),
                   "iscsi_target_mod is loaded (the LIO iSCSI target)", "modprobe iscsi_target_mod"))
    checks.append((bool(shutil.which("iscsiadm")), "iscsiadm is installed (open-iscsi)",
                   "apt-get install open-iscsi"))
    checks.append((_proc_running("iscsid"), "iscsid is running (the open-iscsi daemon)",
                   "start it: iscsid (or systemctl start iscsid)"))
    checks.append((os.path.exists("/etc/iscsi/initiatorname.iscsi"),
                   "/etc/iscsi/initiatorname.iscsi exists (iscsid needs an initiator name)",
                   "echo InitiatorName=$(iscsi-iname) > /etc/iscsi/initiatorname.iscsi"))
    checks.append((_lo_up(), "the loopback interface is up (the target listens on 127.0.0.1)",
                   "ip link set lo up"))
    return checks


def _iscsi_portal(iqn):
    """'127.0.0.1:3260' of the target's (first) network portal, or ''."""
    nps = _listdir(f"{ISCSI}/{iqn}/tpgt_1/np")
    return nps[0] if nps else ""


def _iscsi_session(iqn):
    """The iscsi_session sysfs dir of a logged-in target, or ''."""
    for s in _listdir(ISCSI_SESSIONS):
        if _read(f"{ISCSI_SESSIONS}/{s}/targetname") == iqn:
            return f"{ISCSI_SESSIONS}/{s}"
    return ""


def _iscsi_disk_name(iqn):
    """sdX of LUN 0 of a logged-in target, or ''."""
    sess = _iscsi_session(iqn)
    if not sess:
        return ""
    real = os.path.realpath(f"{sess}/device")            # .../hostH/sessionN
    for b in sorted(glob.glob(f"{real}/target*/*:*:*:0/block/*")):
        return os.path.basename(b)
    return ""


def _iscsi_export(dev_id, ddir, port, wait):
    """Create the iSCSI target for a backstore, log in, return sdX."""
    iqn = iqn_for(dev_id)
    tpg = f"{ISCSI}/{iqn}/tpgt_1"
    if os.path.exists(f"{ISCSI}/{iqn}"):
        raise AttachError(f"{ISCSI}/{iqn} exists already")
    os.makedirs(f"{tpg}/lun/lun_0")     # mkdir of target/iscsi loads iscsi_target_mod
    os.symlink(ddir, f"{tpg}/lun/lun_0/dev_{dev_id}")
    ports = [port] if port else range(ISCSI_PORT, ISCSI_PORT + ISCSI_PORT_TRIES)
    portal = None
    for p in ports:
        np_dir = f"{tpg}/np/{ISCSI_ADDR}:{p}"
        try:
            os.mkdir(np_dir)            # binds the port (shared between LIO targets)
            portal = f"{ISCSI_ADDR}:{p}"
            break
        except OSError as e:
            last = e
            if port:
                raise AttachError(f"cannot listen on {ISCSI_ADDR}:{p}: {e.strerror or e}") from None
    if portal is None:
        raise AttachError(f"no free iSCSI port in {ISCSI_PORT}-{ISCSI_PORT + ISCSI_PORT_TRIES - 1}"
                          f": {last.strerror or last}")
    for name, val in (("generate_node_acls", 1), ("cache_dynamic_acls", 1),
                      ("demo_mode_write_protect", 0), ("authentication", 0)):
        _write(f"{tpg}/attrib/{name}", str(val))
    _write(f"{tpg}/enable", "1")
    r = _iscsiadm("-m", "discovery", "-t", "sendtargets", "-p", portal, "-o", "new")
    if iqn not in r.stdout:
        raise AttachError(f"discovery on {portal} did not list {iqn}: {r.stdout.strip()[-500:]}")
    _iscsiadm("-m", "node", "-T", iqn, "-p", portal, "--login")
    deadline = time.monotonic() + wait
    while True:
        name = _iscsi_disk_name(iqn)
        if name and _read(f"/sys/block/{name}/size", "0") not in ("", "0") and \
                os.path.isdir(f"/sys/block/{name}/queue") and os.path.exists(f"/dev/{name}"):
            return name
        if time.monotonic() > deadline:
            sess = _iscsi_session(iqn)
            raise AttachError(f"logged in to {iqn} at {portal}, but no block device appeared "
                              f"within {wait:.0f} s"
                              + (f" ({sess}: state {_read(sess + '/state', '?')})" if sess else
                                 " (no iSCSI session in sysfs)"))
        time.sleep(0.01 if time.monotonic() + 1 < deadline else 0.1)


def _iscsi_teardown(iqn):
    """Log out, delete the node record, then remove the target: disable the
    TPG, the LUN link and dir, the network portals, the TPG, the target."""
    errors = []
    tpg = f"{ISCSI}/{iqn}/tpgt_1"
    portal = _iscsi_portal(iqn)
    if shutil.which("iscsiadm"):
        if _iscsi_session(iqn):
            args = ["-m", "node", "-T", iqn] + (["-p", portal] if portal else []) + ["--logout"]
            r = _iscsiadm(*args, check=False)
            if r.returncode and _iscsi_session(iqn):
                errors.append(f"logout from {iqn}: {(r.stderr or r.stdout).strip()[-300:]}")
        args = ["-m", "node", "-T", iqn] + (["-p", portal] if portal else []) + ["-o", "delete"]
        _iscsiadm(*args, check=False)       # exits 21 when there is no record: fine
    if errors:                              # never pull the target from under a live session
        return errors
    if os.path.exists(f"{tpg}/enable"):
        try:
            _write(f"{tpg}/enable", "0")
        except OSError:
            pass                            # "already disabled" is EINVAL
    lun = f"{tpg}/lun/lun_0"
    _unlink_luns(lun, errors)
    _rmdirs([lun] + [f"{tpg}/np/{n}" for n in _listdir(f"{tpg}/np")] + [tpg, f"{ISCSI}/{iqn}"],
            errors)
    return errors


def _id_of_disk(dev):
    """dev id of an attached /dev/sdX (through its loopback LUN or its iSCSI session)."""
    name = os.path.basename(os.path.realpath(dev))
    devpath = os.path.realpath(f"/sys/block/{name}/device")
    target = os.path.basename(devpath)                                          # h:c:t:l
    m = re.search(r"/(session[0-9]+)/", devpath)
    if m:
        iqn = _read(f"{ISCSI_SESSIONS}/{m.group(1)}/targetname")
        if iqn.startswith(ISCSI_IQN_PREFIX) and _ID.match(iqn[len(ISCSI_IQN_PREFIX):]):
            return iqn[len(ISCSI_IQN_PREFIX):]
    for naa in _listdir(LOOPBACK):
        addr = _read(f"{LOOPBACK}/{naa}/tpgt_1/address")
        if addr and target == f"{addr}:0":
            for link in _listdir(f"{LOOPBACK}/{naa}/tpgt_1/lun/lun_0"):
                if link.startswith("dev_"):
                    return link[4:]
    raise AttachError(f"{dev}: not an attached overlaybd device")


def _listdir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _mounted(dev):
    real = os.path.realpath(dev)
    for line in _read("/proc/mounts").splitlines():
        src = line.split(" ", 1)[0]
        if src in (dev, real):
            return True
    return False


def detach(target, hba=HBA, force=False):
    """Detach by dev id or /dev/sdX; returns the dev id."""
    dev_id = _id_of_disk(target) if target.startswith("/dev/") else str(target)
    if not _ID.match(dev_id):
        raise UsageError(f"{target!r}: expected a dev id (digits) or /dev/sdX")
    if not os.path.isdir(core_dir(dev_id, hba)):
        raise AttachError(f"dev id {dev_id}: {core_dir(dev_id, hba)} does not exist")
    disk = device_of(dev_id)
    if disk and _mounted(disk) and not force:
        raise AttachError(f"{disk} (dev id {dev_id}) is mounted; unmount it first (or --force)")
    errors = _teardown(dev_id, hba)
    if errors:
        raise AttachError("detach left: " + "; ".join(errors))
    return dev_id


def fabric_of(dev_id):
    """'iscsi', 'loopback' or '' (not exported)."""
    if os.path.isdir(f"{ISCSI}/{iqn_for(dev_id)}"):
        return "iscsi"
    if os.path.isdir(f"{LOOPBACK}/{naa_for(dev_id)}"):
        return "loopback"
    return ""


def device_of(dev_id):
    if os.path.isdir(f"{ISCSI}/{iqn_for(dev_id)}"):
        name = _iscsi_disk_name(iqn_for(dev_id))
        return f"/dev/{name}" if name else ""
    naa = naa_for(dev_id)
    addr = _read(f"{LOOPBACK}/{naa}/tpgt_1/address")
    if not addr:
        return ""
    names = _listdir(f"/sys/class/scsi_device/{addr}:0/device/block")
    return f"/dev/{names[0]}" if names else ""


def list_devices():
    """Every user backstore with an overlaybd dev_config, and its disk."""
    out = []
    for hba_dir in _listdir(CORE):
        if not hba_dir.startswith("user_"):
            continue
        for dev in _listdir(f"{CORE}/{hba_dir}"):
            base = f"{CORE}/{hba_dir}/{dev}"
            if not os.path.isdir(base) or not os.path.exists(f"{base}/enable"):
                continue
            info = _read(f"{base}/info")
            m = re.search(r"Config:\s*(\S+)", info)
            cfgstr = m.group(1) if m else ""
            if cfgstr and not cfgstr.startswith("overlaybd/"):
                continue
            dev_id = dev[4:] if dev.startswith("dev_") else ""
            path, _, sid = cfgstr[len("overlaybd/"):].partition(";") if cfgstr else ("", "", "")
            ok_id = bool(_ID.match(dev_id))
            fabric = fabric_of(dev_id) if ok_id else ""
            out.append({"hba": hba_dir[5:], "name": dev, "dev_id": dev_id, "config": path,
                        "cfg_dev_id": sid, "enabled": _read(f"{base}/enable") == "1",
                        "disk": device_of(dev_id) if ok_id else "", "fabric": fabric,
                        "target": iqn_for(dev_id) if fabric == "iscsi" else
                        (naa_for(dev_id) if fabric == "loopback" else ""),
                        "portal": _iscsi_portal(iqn_for(dev_id)) if fabric == "iscsi" else ""})
    return out


# ------------------------------------------------------------------ doctor
def _mounted_fs(fstype, where):
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == fstype and parts[1] == where:
            return True
    return False


def doctor_checks():
    """[(ok, what, how to fix)] for everything attach and serve need."""
    checks = []
    mods = os.path.isdir("/lib/modules/" + os.uname().release)
    modhint = "" if mods else (f" (this kernel {os.uname().release} has no /lib/modules: "
                               f"use a kernel with CONFIG_TARGET_CORE, CONFIG_TCM_USER2 and "
                               f"CONFIG_LOOPBACK_TARGET, e.g. Debian's linux-image-amd64, or a VM)")
    checks.append((os.path.isdir("/sys/module/target_core_mod"), "target_core_mod is loaded",
                   "modprobe target_core_mod" + modhint))
    checks.append((os.path.isdir("/sys/module/target_core_user"),
                   "target_core_user is loaded (TCMU: without it libtcmu's tcmulib_initialize fails "
                   "with \"couldn't resolve ops\")",
                   "modprobe target_core_user" + modhint))
    checks.append((os.path.isdir("/sys/module/tcm_loop"), "tcm_loop is loaded (the loopback fabric "
                   "that makes /dev/sdX)", "modprobe tcm_loop" + modhint))
    checks.append((_mounted_fs("configfs", CONFIGFS), f"configfs is mounted at {CONFIGFS}",
                   f"mount -t configfs none {CONFIGFS}"))
    checks.append((os.path.isdir(CORE), f"{CORE} exists",
                   "load target_core_mod and mount configfs (above)"))
    try:
        ctypes.CDLL("libtcmu.so.2")
        lib_ok = True
    except OSError:
        lib_ok = False
    checks.append((lib_ok, "libtcmu.so.2 loads", "apt-get install libtcmu2"))
    try:
        from tcmu_obd.serve import _tcmu  # noqa: F401
        ext_ok = True
    except ImportError:
        ext_ok = False
    checks.append((ext_ok, "the tcmu_obd.serve._tcmu extension imports",
                   "install libtcmu2, then rebuild: python setup.py build_ext --inplace"))
    root = os.geteuid() == 0
    checks.append((root or os.access(CORE, os.W_OK), "permission to write configfs and /dev/uio*",
                   "run as root (configfs, /dev/uio* and the module parameters need it)"))
    if os.path.isdir(PARAMS):
        for name in ("block_netlink", "reset_netlink"):
            p = f"{PARAMS}/{name}"
            checks.append((os.path.exists(p), f"target_core_user parameter {name} exists",
                           "a kernel >= 5.x has it; without it daemon restarts cannot unstick "
                           "pending netlink commands"))
    pids = _daemon_pids()
    checks.append((bool(pids), "an overlaybd TCMU daemon is running"
                   + (f" (pid {', '.join(map(str, pids))})" if pids else ""),
                   "start it: tcmu-obd serve [/etc/overlaybd/overlaybd.json] (or overlaybd-tcmu)"))
    return checks


def doctor_problems():
    return [(what, fix) for ok, what, fix in doctor_checks() if not ok and "daemon" not in what]


def list_json(devs):
    return json.dumps(devs, indent=2)
