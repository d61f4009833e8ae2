"""A global config named on the command line is used or refused, never
silently replaced by the built-in defaults: a missing --service-config (or
`tcmu-obd serve PATH`, `overlaybd-tcmu PATH`) is an error naming the path,
and one that enables a feature tcmu-obd lacks stops the tool before it does
anything.  Run through the installed console scripts, with this tree first
on PYTHONPATH."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tcmu_obd.image import baselayer
from tcmu_obd import service_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args, text=True):
    """Run a console script (or its module when the script is not installed)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    exe = shutil.which(name)
    module = {"tcmu-obd": "main", "overlaybd-tcmu": "serve", "overlaybd-merge": "merge",
              "overlaybd-apply": "apply"}[name]
    fn = "main_overlaybd_tcmu" if name == "overlaybd-tcmu" else "main"
    cmd = [exe] if exe else [sys.executable, "-c",
                             f"from tcmu_obd.cli.{module} import {fn}; {fn}()"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=text, env=env,
                          timeout=120)


@pytest.fixture
def image_cfg(tmp_path):
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps({"lowers": [{"file": baselayer.path()}],
                               "resultFile": str(tmp_path / "result")}))
    return cfg


def missing_path(tmp_path):
    return tmp_path / "no" / "overlaybd.json"


COMMANDS = {
    "read --service-config": lambda cfg, svc, tmp: ("tcmu-obd", "read", "--service-config", svc, cfg, 0, 512),
    "read --service_config_path": lambda cfg, svc, tmp: ("tcmu-obd", "read", cfg, 0, 512,
                                                         "--service_config_path", svc),
    "read of a layer file": lambda cfg, svc, tmp: ("tcmu-obd", "read", baselayer.path(), 0, 512,
                                                   "--service-config", svc),
    "serve PATH": lambda cfg, svc, tmp: ("tcmu-obd", "serve", svc, "--pid-file", tmp / "pid"),
    "serve --service-config": lambda cfg, svc, tmp: ("tcmu-obd", "serve", "--service-config", svc,
                                                     "--pid-file", tmp / "pid"),
    "overlaybd-tcmu PATH": lambda cfg, svc, tmp: ("overlaybd-tcmu", svc),
    "overlaybd-merge": lambda cfg, svc, tmp: ("overlaybd-merge", "--service_config_path", svc, cfg,
                                              tmp / "merged"),
    "overlaybd-apply --raw": lambda cfg, svc, tmp: ("overlaybd-apply", "--raw", "--service-config", svc,
                                                    tmp / "layer.tar", tmp / "raw.img"),
}


@pytest.mark.parametrize("how", list(COMMANDS))
def test_cli_explicit_config_missing_is_an_error(tmp_path, image_cfg, how):
    svc = missing_path(tmp_path)
    r = script(*COMMANDS[how](image_cfg, svc, tmp_path))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"{svc}: cannot read: No such file or directory" in r.stderr, r.stderr
    assert not (tmp_path / "merged").exists() and not (tmp_path / "result").exists()


@pytest.mark.parametrize("how", list(COMMANDS))
def test_cli_explicit_config_bad_snapshot_api_address_refused(tmp_path, image_cfg, how):
    svc = tmp_path / "overlaybd.json"
    svc.write_text(json.dumps({"serviceConfig": {"enable": True, "address": "ftp://127.0.0.1:9862"}}))
    r = script(*COMMANDS[how](image_cfg, svc, tmp_path))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f'{svc}: serviceConfig.address = "ftp://127.0.0.1:9862": scheme \'ftp\'' in r.stderr, r.stderr
    assert not (tmp_path / "merged").exists() and not (tmp_path / "result").exists()


def test_cli_explicit_config_absent_default_gives_builtin_defaults(tmp_path, image_cfg):
    """Without the option the tool runs (here the default path is absent)."""
    if os.path.exists(service_config.DEFAULT_PATH):
        pytest.skip(f"{service_config.DEFAULT_PATH} exists on this machine")
    r = script("tcmu-obd", "read", image_cfg, 1080, 2, text=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"\x53\xef"                   # the ext4 magic of the base layer
    assert (tmp_path / "result").read_text() == "success"
    svc = tmp_path / "overlaybd.json"
    svc.write_text("{}")
    r = script("tcmu-obd", "read", "--service-config", svc, image_cfg, 1080, 2, text=False)
    assert r.returncode == 0 and r.stdout == b"\x53\xef", r.stderr


def test_cli_explicit_config_serve_two_different_paths_refused(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("{}")
    b.write_text("{}")
    r = script("tcmu-obd", "serve", a, "--service-config", b, "--pid-file", tmp_path / "pid")
    assert r.returncode == 1 and f"two global configs given: {a} and --service-config {b}" in r.stderr
