"""Attach and detach overlaybd devices through configfs, as the overlaybd
snapshotter does: a `user` backstore handled by the daemon (`tcmu-obd
serve`), exported through the tcm_loop fabric as a local SCSI disk (/dev/sdX),
or over iSCSI (serve.iscsi); and the list of attached devices.  This module
only writes configfs/sysfs; it never talks to libtcmu.  The checks of what is
missing are serve.doctor."""
import errno
import os
import re
import time

from tcmu_obd.errors import AttachError, UsageError
from tcmu_obd.image import config
from tcmu_obd.serve import iscsi as fabric_iscsi
from tcmu_obd.serve.configfs import (CMD_RING_SIZE_MB, CMD_TIME_OUT, CORE, DEV_ID, ENABLE_RETRIES,
                                     ENABLE_SLEEP, HBA, ISCSI, LOOPBACK, MAX_DATA_AREA_MB, PARAMS,
                                     core_dir, daemon_pids, listdir, load_module, naa_for,
                                     proc_running, read_text, rmdirs, unlink_luns, write)


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
                write(f"{dev_dir}/enable", "1")
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
                write(f"{PARAMS}/{name}", str(val))
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
        addr = read_text(f"{LOOPBACK}/{naa}/tpgt_1/address")
        if addr:
            bdir = f"/sys/class/scsi_device/{addr}:0/device/block"
            try:
                names = os.listdir(bdir)
            except OSError:
                names = []
            # sd lists the disk before it has read the capacity and registered the queue
            if names and read_text(f"/sys/block/{names[0]}/size", "0") not in ("", "0") and \
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
        load_module("iscsi_target_mod")     # fabric_iscsi.checks() below says what is missing
        problems = [f"{what}: {fix}" for ok, what, fix in fabric_iscsi.checks() if not ok]
        if problems:
            raise AttachError("--iscsi cannot work here: " + "; ".join(problems))
    config_path = os.path.abspath(config_path)
    cfg = config.load(config_path)              # fail early on a bad config
    if not os.path.isdir(CORE):
        raise AttachError(f"{CORE} is missing: configfs or target_core_mod is not there; "
                          f"see `tcmu-obd doctor`")
    if check_daemon and not daemon_pids():
        raise AttachError("no overlaybd TCMU daemon is running (start `tcmu-obd serve` first); "
                          "an enable with no handler blocks in the kernel")
    explicit = dev_id is not None
    dev_id = str(dev_id) if explicit else _free_id(hba)
    if not DEV_ID.match(dev_id):
        raise UsageError(f"--dev-id {dev_id!r}: must be 1 to 13 decimal digits")
    ddir = core_dir(dev_id, hba)
    if os.path.exists(ddir):
        raise AttachError(f"{ddir} exists already: dev id {dev_id} is in use "
                          f"(`tcmu-obd detach {dev_id}` first)")
    naa = naa_for(dev_id)
    os.makedirs(ddir)
    try:
        cfgstr = f"overlaybd/{config_path}" + (f";{dev_id}" if explicit else "")
        write(f"{ddir}/control", f"dev_config={cfgstr}")
        write(f"{ddir}/control", f"max_data_area_mb={MAX_DATA_AREA_MB}")
        if cmd_ring_size_mb:
            try:
                write(f"{ddir}/control", f"cmd_ring_size_mb={cmd_ring_size_mb}")
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
            why = read_text(cfg.result_file) if cfg.result_file else ""
            hint = ""
            if e.errno == errno.ENOENT and proc_running("tcmu-runner"):
                # every libtcmu process answers every device event; one with no
                # handler for the subtype answers -ENOENT, and the first answer wins
                hint = ("; tcmu-runner is running too and may have refused the device "
                        "before tcmu-obd answered (stop it, or retry)")
            raise AttachError(f"enabling {ddir} failed: {e.strerror or e}"
                              + (f"; {cfg.result_file}: {why}" if why else
                                 "; the daemon log has the reason") + hint) from None
        write(f"{ddir}/attrib/cmd_time_out", str(cmd_time_out))
        if iscsi:
            sd = fabric_iscsi.export(dev_id, ddir, iscsi_port, wait)
        else:
            tpg = f"{LOOPBACK}/{naa}/tpgt_1"
            os.makedirs(f"{tpg}/lun/lun_0", exist_ok=True)
            write(f"{tpg}/nexus", naa)
            os.symlink(ddir, f"{tpg}/lun/lun_0/dev_{dev_id}")
            sd = _scsi_disk(naa, wait)
        try:
            write(f"/sys/block/{sd}/device/timeout", str(cmd_time_out))
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


def _teardown(dev_id, hba=HBA):
    """Remove whatever exists of a device, in reverse order: for iSCSI the
    initiator session and node record first, then the target; then the
    loopback fabric; the core backstore last."""
    errors = []
    iqn = fabric_iscsi.iqn_for(dev_id)
    if os.path.isdir(f"{ISCSI}/{iqn}"):
        errors += fabric_iscsi.teardown(iqn)
    naa = naa_for(dev_id)
    tpg = f"{LOOPBACK}/{naa}/tpgt_1"
    lun = f"{tpg}/lun/lun_0"
    unlink_luns(lun, errors)
    rmdirs((lun, tpg, f"{LOOPBACK}/{naa}", core_dir(dev_id, hba)), errors)
    return errors


def _id_of_disk(dev):
    """dev id of an attached /dev/sdX (through its loopback LUN or its iSCSI session)."""
    name = os.path.basename(os.path.realpath(dev))
    devpath = os.path.realpath(f"/sys/block/{name}/device")
    target = os.path.basename(devpath)                                          # h:c:t:l
    m = re.search(r"/(session[0-9]+)/", devpath)
    if m:
        iqn = read_text(f"{fabric_iscsi.ISCSI_SESSIONS}/{m.group(1)}/targetname")
        if iqn.startswith(fabric_iscsi.ISCSI_IQN_PREFIX) and DEV_ID.match(iqn[len(fabric_iscsi.ISCSI_IQN_PREFIX):]):
            return iqn[len(fabric_iscsi.ISCSI_IQN_PREFIX):]
    for naa in listdir(LOOPBACK):
        addr = read_text(f"{LOOPBACK}/{naa}/tpgt_1/address")
        if addr and target == f"{addr}:0":
            for link in listdir(f"{LOOPBACK}/{naa}/tpgt_1/lun/lun_0"):
                if link.startswith("dev_"):
                    return link[4:]
    raise AttachError(f"{dev}: not an attached overlaybd device")


def _mounted(dev):
    real = os.path.realpath(dev)
    for line in read_text("/proc/mounts").splitlines():
        src = line.split(" ", 1)[0]
        if src in (dev, real):
            return True
    return False


def detach(target, hba=HBA, force=False):
    """Detach by dev id or /dev/sdX; returns the dev id."""
    dev_id = _id_of_disk(target) if target.startswith("/dev/") else str(target)
    if not DEV_ID.match(dev_id):
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
    if os.path.isdir(f"{ISCSI}/{fabric_iscsi.iqn_for(dev_id)}"):
        return "iscsi"
    if os.path.isdir(f"{LOOPBACK}/{naa_for(dev_id)}"):
        return "loopback"
    return ""


def device_of(dev_id):
    if os.path.isdir(f"{ISCSI}/{fabric_iscsi.iqn_for(dev_id)}"):
        name = fabric_iscsi.disk_of(fabric_iscsi.iqn_for(dev_id))
        return f"/dev/{name}" if name else ""
    naa = naa_for(dev_id)
    addr = read_text(f"{LOOPBACK}/{naa}/tpgt_1/address")
    if not addr:
        return ""
    names = listdir(f"/sys/class/scsi_device/{addr}:0/device/block")
    return f"/dev/{names[0]}" if names else ""


def list_devices():
    """Every user backstore with an overlaybd dev_config, and its disk."""
    out = []
    for hba_dir in listdir(CORE):
        if not hba_dir.startswith("user_"):
            continue
        for dev in listdir(f"{CORE}/{hba_dir}"):
            base = f"{CORE}/{hba_dir}/{dev}"
            if not os.path.isdir(base) or not os.path.exists(f"{base}/enable"):
                continue
            info = read_text(f"{base}/info")
            m = re.search(r"Config:\s*(\S+)", info)
            cfgstr = m.group(1) if m else ""
            if cfgstr and not cfgstr.startswith("overlaybd/"):
                continue
            dev_id = dev[4:] if dev.startswith("dev_") else ""
            path, _, sid = cfgstr[len("overlaybd/"):].partition(";") if cfgstr else ("", "", "")
            ok_id = bool(DEV_ID.match(dev_id))
            fabric = fabric_of(dev_id) if ok_id else ""
            out.append({"hba": hba_dir[5:], "name": dev, "dev_id": dev_id, "config": path,
                        "cfg_dev_id": sid, "enabled": read_text(f"{base}/enable") == "1",
                        "disk": device_of(dev_id) if ok_id else "", "fabric": fabric,
                        "target": fabric_iscsi.iqn_for(dev_id) if fabric == "iscsi" else
                        (naa_for(dev_id) if fabric == "loopback" else ""),
                        "portal": fabric_iscsi.portal_of(fabric_iscsi.iqn_for(dev_id)) if fabric == "iscsi" else ""})
    return out
