"""`tcmu-obd install` / `uninstall` into a temporary --root, run as the
console tool would be: every overlaybd path exists, the wrappers run this
tree's tools (overlaybd-create --help, an overlaybd-zfile round trip),
systemd-analyze accepts the unit, a second install changes nothing, uninstall
keeps an operator-changed overlaybd.json, a foreign overlaybd-tcmu is refused
unless --force (and put back by uninstall), and a damaged manifest is a clear
error."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest

from tcmu_obd import service_config
from tcmu_obd.image import baselayer

REPO = pathlib.Path(__file__).resolve().parent.parent
TOOLS = ["overlaybd-tcmu", "overlaybd-create", "overlaybd-commit", "overlaybd-apply",
         "overlaybd-zfile", "overlaybd-merge"]


def tool(*args, env=None):
    env = dict(os.environ if env is None else env,
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "tcmu_obd", *args], capture_output=True,
                          text=True, env=env, cwd=REPO)


def install(root, *extra):
    r = tool("install", "--root", str(root), *extra)
    return r


def snapshot(root):
    out = {}
    for p in sorted(pathlib.Path(root).rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns,
                                         p.read_bytes() if p.is_file() else None)
    return out


def test_install_layout_every_path_and_wrappers_run(tmp_path):
    root = tmp_path / "root"
    r = install(root)
    assert r.returncode == 0, r.stderr
    for t in TOOLS:
        p = root / "opt/overlaybd/bin" / t
        assert p.is_file() and os.access(p, os.X_OK), t
    layer = root / "opt/overlaybd/baselayers/ext4_64"
    assert hashlib.sha256(layer.read_bytes()).hexdigest() == baselayer.SHA256
    cfg = json.loads((root / "etc/overlaybd/overlaybd.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # no unknown key, nothing refused
        assert service_config.load(root / "etc/overlaybd/overlaybd.json") == service_config.ServiceConfig()
    assert cfg["cacheConfig"]["cacheDir"] == "/opt/overlaybd/registry_cache"
    assert cfg["credentialFilePath"] == "/opt/overlaybd/cred.json"
    unit = (root / "etc/systemd/system/overlaybd-tcmu.service").read_text()
    assert "ExecStart=/opt/overlaybd/bin/overlaybd-tcmu\n" in unit
    assert (root / "opt/overlaybd/.tcmu-obd-install.json").is_file()
    # the wrappers run without PYTHONPATH or PATH help: they carry interpreter and module path
    bare = {"PATH": "/usr/bin:/bin"}
    h = subprocess.run([root / "opt/overlaybd/bin/overlaybd-create", "--help"],
                       capture_output=True, text=True, env=bare)
    assert h.returncode == 0, h.stderr
    assert h.stdout.startswith("usage: overlaybd-create") and "Create a writable overlaybd layer" in h.stdout
    src = tmp_path / "data"
    src.write_bytes(os.urandom(100_000) + bytes(300_000))
    z = root / "opt/overlaybd/bin/overlaybd-zfile"
    r1 = subprocess.run([z, src, tmp_path / "data.zf"], capture_output=True, text=True, env=bare)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([z, "-x", tmp_path / "data.zf", tmp_path / "back"], capture_output=True,
                        text=True, env=bare)
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "back").read_bytes() == src.read_bytes()


def test_install_layout_systemd_analyze_accepts_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found: apt-get install systemd (scripts/setup.sh does)"
    root = tmp_path / "root"
    assert install(root).returncode == 0
    # verify --root resolves everything inside the root: give it systemd's own
    # units (for the unit's dependencies) and modprobe (its ExecStartPre)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "sbin").mkdir()
    shutil.copy(os.path.realpath("/sbin/modprobe"), root / "sbin/modprobe")
    r = subprocess.run([analyze, "verify", f"--root={root}",
                        root / "etc/systemd/system/overlaybd-tcmu.service"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_install_layout_idempotent(tmp_path):
    root = tmp_path / "root"
    assert install(root).returncode == 0
    before = snapshot(root)
    r = install(root)
    assert r.returncode == 0, r.stderr
    assert "nothing to change" in r.stdout
    assert snapshot(root) == before


def test_install_layout_uninstall_keeps_operator_config(tmp_path):
    root = tmp_path / "root"
    assert install(root).returncode == 0
    cfg = root / "etc/overlaybd/overlaybd.json"
    cfg.write_text('{"logConfig": {"logLevel": 0}}\n')
    r = tool("uninstall", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert cfg.read_text() == '{"logConfig": {"logLevel": 0}}\n'
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == ["etc", "etc/overlaybd", "etc/overlaybd/overlaybd.json"]


def test_install_layout_keeps_existing_config_and_uninstall_leaves_it(tmp_path):
    root = tmp_path / "root"
    cfg = root / "etc/overlaybd/overlaybd.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("{}\n")
    r = install(root)
    assert r.returncode == 0 and "kept" in r.stdout
    assert cfg.read_text() == "{}\n"
    assert tool("uninstall", "--root", str(root)).returncode == 0
    assert cfg.read_text() == "{}\n"
    assert not (root / "opt").exists()


def test_install_layout_refuses_foreign_overlaybd_then_force(tmp_path):
    root = tmp_path / "root"
    foreign = root / "opt/overlaybd/bin/overlaybd-tcmu"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"\x7fELF a real overlaybd-tcmu")
    r = install(root)
    assert r.returncode != 0
    assert str(foreign) in r.stderr and "--force" in r.stderr
    assert foreign.read_bytes() == b"\x7fELF a real overlaybd-tcmu"
    assert not (root / "opt/overlaybd/bin/overlaybd-create").exists()     # nothing written
    r = install(root, "--force")
    assert r.returncode == 0, r.stderr
    assert b"tcmu-obd install wrapper" in foreign.read_bytes()
    assert install(root).returncode == 0          # ours now: no refusal the second time
    assert tool("uninstall", "--root", str(root)).returncode == 0
    assert foreign.read_bytes() == b"\x7fELF a real overlaybd-tcmu"


@pytest.mark.parametrize("text", ["not json", '{"files": 3}'], ids=["not-json", "files-not-object"])
def test_install_layout_bad_manifest_is_clear_error(tmp_path, text):
    root = tmp_path / "root"
    m = root / "opt/overlaybd/.tcmu-obd-install.json"
    m.parent.mkdir(parents=True)
    m.write_text(text)
    for args in (["install"], ["uninstall"]):
        r = tool(*args, "--root", str(root))
        assert r.returncode != 0 and str(m) in r.stderr and "Traceback" not in r.stderr


def test_install_layout_uninstall_without_install(tmp_path):
    r = tool("uninstall", "--root", str(tmp_path))
    assert r.returncode != 0 and ".tcmu-obd-install.json" in r.stderr and "Traceback" not in r.stderr
