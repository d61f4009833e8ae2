"""The iSCSI fabric for `tcmu-obd attach --iscsi`: a backstore exported as
an iSCSI target on 127.0.0.1 (iscsi_target_mod: target/iscsi/<iqn>/tpgt_1
with np 127.0.0.1:<port>, lun_0, generate_node_acls=1 (demo mode) and
authentication=0), which the kernel initiator logs in to through open-iscsi's
`iscsiadm` (discovery sendtargets + login; iscsid must be running and the
loopback interface up).  Teardown logs out, deletes the node record, then
removes the target in reverse order.  Not the backstore (serve.attach)."""
import glob
import os
import shutil
import subprocess
import time

from tcmu_obd.errors import AttachError
from tcmu_obd.serve.configfs import ISCSI, listdir, proc_running, read_text, rmdirs, unlink_luns, write

ISCSI_IQN_PREFIX = "iqn.2024-01.io.github.tcmu-obd:dev-"
ISCSI_ADDR = "127.0.0.1"
ISCSI_PORT = 3260
ISCSI_PORT_TRIES = 16               # auto port: 3260, 3261, ... when one is taken
ISCSI_SESSIONS = "/sys/class/iscsi_session"
ISCSIADM_TIMEOUT = 120


def iqn_for(dev_id):
    """The target name of an iSCSI-exported device: <prefix><dev id>."""
    return f"{ISCSI_IQN_PREFIX}{dev_id}"


def iscsiadm(*args, check=True):
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


def lo_up():
    try:
        return int(read_text("/sys/class/net/lo/flags", "0"), 16) & 0x1 == 1     # IFF_UP
    except ValueError:
        return False


def checks():
    """[(ok, what, how to fix)] for `attach --iscsi`."""
    checks = []
    have_mod = os.path.isdir("/sys/module/iscsi_target_mod")
    checks.append((have_mod or os.path.isdir(ISCSI),
                   "iscsi_target_mod is loaded (the LIO iSCSI target)", "modprobe iscsi_target_mod"))
    checks.append((bool(shutil.which("iscsiadm")), "iscsiadm is installed (open-iscsi)",
                   "apt-get install open-iscsi"))
    checks.append((proc_running("iscsid"), "iscsid is running (the open-iscsi daemon)",
                   "start it: iscsid (or systemctl start iscsid)"))
    checks.append((os.path.exists("/etc/iscsi/initiatorname.iscsi"),
                   "/etc/iscsi/initiatorname.iscsi exists (iscsid needs an initiator name)",
                   "echo InitiatorName=$(iscsi-iname) > /etc/iscsi/initiatorname.iscsi"))
    checks.append((lo_up(), "the loopback interface is up (the target listens on 127.0.0.1)",
                   "ip link set lo up"))
    return checks


def portal_of(iqn):
    """'127.0.0.1:3260' of the target's (first) network portal, or ''."""
    nps = listdir(f"{ISCSI}/{iqn}/tpgt_1/np")
    return nps[0] if nps else ""


def session_of(iqn):
    """The iscsi_session sysfs dir of a logged-in target, or ''."""
    for s in listdir(ISCSI_SESSIONS):
        if read_text(f"{ISCSI_SESSIONS}/{s}/targetname") == iqn:
            return f"{ISCSI_SESSIONS}/{s}"
    return ""


def disk_of(iqn):
    """sdX of LUN 0 of a logged-in target, or ''."""
    sess = session_of(iqn)
    if not sess:
        return ""
    real = os.path.realpath(f"{sess}/device")            # .../hostH/sessionN
    for b in sorted(glob.glob(f"{real}/target*/*:*:*:0/block/*")):
        return os.path.basename(b)
    return ""


def export(dev_id, ddir, port, wait):
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
        write(f"{tpg}/attrib/{name}", str(val))
    write(f"{tpg}/enable", "1")
    r = iscsiadm("-m", "discovery", "-t", "sendtargets", "-p", portal, "-o", "new")
    if iqn not in r.stdout:
        raise AttachError(f"discovery on {portal} did not list {iqn}: {r.stdout.strip()[-500:]}")
    iscsiadm("-m", "node", "-T", iqn, "-p", portal, "--login")
    deadline = time.monotonic() + wait
    while True:
        name = disk_of(iqn)
        if name and read_text(f"/sys/block/{name}/size", "0") not in ("", "0") and \
                os.path.isdir(f"/sys/block/{name}/queue") and os.path.exists(f"/dev/{name}"):
            return name
        if time.monotonic() > deadline:
            sess = session_of(iqn)
            raise AttachError(f"logged in to {iqn} at {portal}, but no block device appeared "
                              f"within {wait:.0f} s"
                              + (f" ({sess}: state {read_text(sess + '/state', '?')})" if sess else
                                 " (no iSCSI session in sysfs)"))
        time.sleep(0.01 if time.monotonic() + 1 < deadline else 0.1)


def teardown(iqn):
    """Log out, delete the node record, then remove the target: disable the
    TPG, the LUN link and dir, the network portals, the TPG, the target."""
    errors = []
    tpg = f"{ISCSI}/{iqn}/tpgt_1"
    portal = portal_of(iqn)
    if shutil.which("iscsiadm"):
        if session_of(iqn):
            args = ["-m", "node", "-T", iqn] + (["-p", portal] if portal else []) + ["--logout"]
            r = iscsiadm(*args, check=False)
            if r.returncode and session_of(iqn):
                errors.append(f"logout from {iqn}: {(r.stderr or r.stdout).strip()[-300:]}")
        args = ["-m", "node", "-T", iqn] + (["-p", portal] if portal else []) + ["-o", "delete"]
        iscsiadm(*args, check=False)       # exits 21 when there is no record: fine
    if errors:                              # never pull the target from under a live session
        return errors
    if os.path.exists(f"{tpg}/enable"):
        try:
            write(f"{tpg}/enable", "0")
        except OSError:
            pass                            # "already disabled" is EINVAL
    lun = f"{tpg}/lun/lun_0"
    unlink_luns(lun, errors)
    rmdirs([lun] + [f"{tpg}/np/{n}" for n in listdir(f"{tpg}/np")] + [tpg, f"{ISCSI}/{iqn}"],
            errors)
    return errors
