"""`tcmu-obd install` / `uninstall`: lay out, under a root directory, the
files overlaybd's package puts on a machine, so that containerd's
overlaybd-snapshotter and the image convertor find tcmu-obd where they look
for overlaybd: the tools in /opt/overlaybd/bin (small shell wrappers that run
this installation's Python and package), the base layer in
/opt/overlaybd/baselayers, /etc/overlaybd/overlaybd.json (only when absent)
and the systemd unit overlaybd-tcmu.service.

A manifest (/opt/overlaybd/.tcmu-obd-install.json) records each file written
with its SHA-256, so that install is idempotent and uninstall removes only
what install wrote and nobody changed since.  A file of a foreign (real
overlaybd) installation is never overwritten without --force; with --force it
is moved aside to <path>.pre-tcmu-obd and put back by uninstall.

Not a package manager: it does not start, enable or reload services, create
users, or touch anything outside the paths listed in FILES.
"""
import hashlib
import json
import os
import shlex
import sys

import tcmu_obd
from tcmu_obd import service_config
from tcmu_obd.core import fileio
from tcmu_obd.errors import InstallError
from tcmu_obd.image import baselayer

MANIFEST = "opt/overlaybd/.tcmu-obd-install.json"
BIN_DIR = "opt/overlaybd/bin"
BASELAYER = baselayer.INSTALL_PATH.lstrip("/")
CONFIG = service_config.DEFAULT_PATH.lstrip("/")
UNIT = "etc/systemd/system/overlaybd-tcmu.service"
BACKUP_SUFFIX = ".pre-tcmu-obd"
WRAPPER_MARK = "# tcmu-obd install wrapper"

# overlaybd's tool names -> the function of ours each runs
TOOLS = {
    "overlaybd-tcmu": ("tcmu_obd.cli.serve", "main_overlaybd_tcmu"),
    "overlaybd-create": ("tcmu_obd.cli.create", "main"),
    "overlaybd-commit": ("tcmu_obd.cli.commit", "main"),
    "overlaybd-apply": ("tcmu_obd.cli.apply", "main"),
    "turboOCI-apply": ("tcmu_obd.cli.turbo_apply", "main"),
    "overlaybd-zfile": ("tcmu_obd.cli.zfile", "main"),
    "overlaybd-merge": ("tcmu_obd.cli.merge", "main"),
}

UNIT_TEXT = """\
# Written by `tcmu-obd install`: the overlaybd-tcmu daemon, served by tcmu-obd.
[Unit]
Description=overlaybd-tcmu: overlaybd block devices over TCMU (tcmu-obd)
# TCMU lives in configfs, and the target_core_user module must be loaded
Requires=sys-kernel-config.mount
After=sys-kernel-config.mount systemd-modules-load.service network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStartPre=/sbin/modprobe target_core_user
ExecStart=/opt/overlaybd/bin/overlaybd-tcmu
Restart=always
LimitNOFILE=1048576
LimitCORE=infinity

[Install]
WantedBy=multi-user.target
"""


def wrapper_text(tool, python=None, module_dir=None):
    """The shell wrapper for overlaybd tool `tool`: runs this installation's
    interpreter with this package first on sys.path (works from a venv and
    from a source tree alike)."""
    python = python or sys.executable
    module_dir = module_dir or os.path.dirname(os.path.dirname(os.path.abspath(tcmu_obd.__file__)))
    mod, fn = TOOLS[tool]
    code = (f"import sys; sys.path.insert(0, {json.dumps(module_dir)}); sys.argv[0] = {json.dumps(tool)}; "
            f"from {mod} import {fn}; {fn}()")
    return (f"#!/bin/sh\n{WRAPPER_MARK}: runs tcmu-obd's {tool}\n"
            f"exec {shlex.quote(python)} -c {shlex.quote(code)} \"$@\"\n")


def config_text():
    """overlaybd.json with overlaybd's defaults as service_config knows them;
    userAgent is left out so that it follows the installed version."""
    d = service_config.ServiceConfig().to_dict()
    d.pop("userAgent")
    return json.dumps(d, indent=4) + "\n"


def _baselayer_bytes():
    with open(baselayer.path(), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != baselayer.SHA256:
        raise InstallError(f"{baselayer.path()}: sha256 is not {baselayer.SHA256}: "
                           "the bundled base layer is damaged; reinstall tcmu-obd")
    return data


def planned():
    """[(relative path, bytes, mode, policy)]; policy 'own' (ours: a foreign
    file there is a conflict) or 'keep' (written only when absent)."""
    files = [(f"{BIN_DIR}/{t}", wrapper_text(t).encode(), 0o755, "own") for t in TOOLS]
    files.append((BASELAYER, _baselayer_bytes(), 0o644, "own"))
    files.append((UNIT, UNIT_TEXT.encode(), 0o644, "own"))
    files.append((CONFIG, config_text().encode(), 0o644, "keep"))
    return files


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _file_sha(path):
    try:
        with open(path, "rb") as f:
            return _sha(f.read())
    except FileNotFoundError:
        return None


def _is_wrapper(path):
    try:
        with open(path, "rb") as f:
            return WRAPPER_MARK.encode() in f.read(4096)
    except OSError:
        return False


def load_manifest(root):
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        return {"files": {}, "backups": {}, "dirs": []}
    except ValueError as e:
        raise InstallError(f"{path}: not valid JSON ({e}): remove it to start over") from None
    if not (isinstance(m, dict) and isinstance(m.get("files"), dict)
            and isinstance(m.get("backups", {}), dict) and isinstance(m.get("dirs", []), list)):
        raise InstallError(f"{path}: field 'files' (an object of path -> sha256) is missing or "
                           "malformed: remove the manifest to start over")
    m.setdefault("backups", {})
    m.setdefault("dirs", [])
    return m


def _write(path, data, mode):
    fileio.write_atomic(path, data, mode, prefix=".tcmu-obd-")


def _makedirs(root, rel, manifest):
    """Create the parents of rel under root, recording each one created."""
    missing = []
    d = os.path.dirname(rel)
    while d and not os.path.isdir(os.path.join(root, d)):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        os.mkdir(os.path.join(root, d), 0o755)
        manifest["dirs"].append(d)


def install(root="/", force=False, out=print):
    """Install under root.  Returns the number of files written or changed
    (0: nothing to change).  Raises InstallError on a foreign file without
    force, before writing anything."""
    root = os.path.abspath(root)
    manifest = load_manifest(root)
    files = planned()
    conflicts = []
    for rel, data, _mode, policy in files:
        cur = _file_sha(os.path.join(root, rel))
        if policy == "own" and cur is not None and cur != _sha(data):
            ours = manifest["files"].get(rel) == cur or (rel.startswith(BIN_DIR) and
                                                          _is_wrapper(os.path.join(root, rel)))
            if not ours:
                conflicts.append(rel)
    if conflicts and not force:
        raise InstallError(f"{os.path.join(root, conflicts[0])}: exists and was not written by "
                           f"tcmu-obd install (an overlaybd installation?); "
                           f"{len(conflicts)} such file(s); use --force to move them aside "
                           f"(to <file>{BACKUP_SUFFIX}) and install")
    changed = 0
    os.makedirs(root, exist_ok=True)
    for rel, data, mode, policy in files:
        path = os.path.join(root, rel)
        cur = _file_sha(path)
        if cur == _sha(data):
            if rel not in manifest["files"] and policy == "own" and rel.startswith(BIN_DIR):
                manifest["files"][rel] = cur          # our wrapper, from a lost manifest
                changed += 1
            out(f"unchanged  {path}")
            continue
        if policy == "keep" and cur is not None:
            out(f"kept       {path} (exists; an operator's file is never overwritten)")
            continue
        if rel in conflicts:
            os.replace(path, path + BACKUP_SUFFIX)
            manifest["backups"][rel] = rel + BACKUP_SUFFIX
            out(f"moved      {path} -> {path + BACKUP_SUFFIX}")
        _makedirs(root, rel, manifest)
        _write(path, data, mode)
        manifest["files"][rel] = _sha(data)
        changed += 1
        out(f"wrote      {path}")
    if changed:
        _makedirs(root, MANIFEST, manifest)
        _write(os.path.join(root, MANIFEST),
               (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), 0o644)
        out(f"tcmu-obd install: {changed} file(s) written under {root}")
    else:
        out(f"tcmu-obd install: nothing to change under {root}")
    return changed


def uninstall(root="/", out=print):
    """Remove what install wrote and nobody changed; put moved-aside files
    back.  Returns the number of files removed."""
    root = os.path.abspath(root)
    mpath = os.path.join(root, MANIFEST)
    if not os.path.exists(mpath):
        raise InstallError(f"{mpath}: no tcmu-obd installation manifest here: nothing to uninstall")
    manifest = load_manifest(root)
    removed, kept = 0, 0
    for rel, sha in sorted(manifest["files"].items()):
        path = os.path.join(root, rel)
        cur = _file_sha(path)
        if cur is None:
            out(f"gone       {path} (already removed)")
        elif cur != sha:
            kept += 1
            out(f"kept       {path} (changed since tcmu-obd installed it)")
        else:
            os.unlink(path)
            removed += 1
            out(f"removed    {path}")
    for rel, backup in sorted(manifest["backups"].items()):
        path, bpath = os.path.join(root, rel), os.path.join(root, backup)
        if os.path.exists(bpath) and not os.path.exists(path):
            os.replace(bpath, path)
            out(f"restored   {path} (from {bpath})")
        elif os.path.exists(bpath):
            out(f"kept       {bpath} ({path} exists: not restored over it)")
    os.unlink(mpath)
    for d in sorted(set(manifest["dirs"]), key=len, reverse=True):
        try:
            os.rmdir(os.path.join(root, d))
        except FileNotFoundError:
            pass
        except OSError:
            out(f"kept       {os.path.join(root, d)}/ (not empty)")
    out(f"tcmu-obd uninstall: {removed} file(s) removed, {kept} kept under {root}")
    return removed
