"""`tcmu-obd doctor`: what serving TCMU devices needs on this machine, each
check with how to fix it.  Only looks; changes nothing."""
import ctypes
import os

from tcmu_obd.serve.configfs import CONFIGFS, CORE, PARAMS, daemon_pids, mounted_fs


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
    checks.append((mounted_fs("configfs", CONFIGFS), f"configfs is mounted at {CONFIGFS}",
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
    pids = daemon_pids()
    checks.append((bool(pids), "an overlaybd TCMU daemon is running"
                   + (f" (pid {', '.join(map(str, pids))})" if pids else ""),
                   "start it: tcmu-obd serve [/etc/overlaybd/overlaybd.json] (or overlaybd-tcmu)"))
    return checks


def doctor_problems():
    return [(what, fix) for ok, what, fix in doctor_checks() if not ok and "daemon" not in what]
