"""`python -m tcmu_obd` is the tcmu-obd tool: the same output, errors and
exit codes as the console script, for --help, a subcommand on a real layer
file, and a usage error."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tcmu_obd.image import baselayer

REPO = pathlib.Path(__file__).resolve().parent.parent


def run(argv):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("args", [["--help"], ["info", baselayer.path()], ["info"],
                                  ["info", "/nonexistent/layer"]],
                         ids=["help", "info", "usage-error", "missing-file"])
def test_main_module_cli_same_as_console_script(args):
    script = shutil.which("tcmu-obd")
    if script is None:
        pytest.skip("the tcmu-obd console script is not installed")
    as_module = run([sys.executable, "-m", "tcmu_obd", *args])
    as_script = run([script, *args])
    assert as_module == as_script
    assert as_module[1] or as_module[2]          # it said something
    if args == ["--help"]:
        assert as_module[0] == 0 and as_module[1].startswith("usage: tcmu-obd")
