"""The guest harness's report when the guest suite runs out of time or
fails, without booting a guest: the progress lines that
tests/vm/guest/conftest.py prints, read back by tests/vm/run.py
(progress_report), and the time limit from TCMU_OBD_VM_TIMEOUT.  The
partial log comes from a real pytest run using the guest conftest, killed
in the middle of a test as qemu would be."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

VM = Path(__file__).resolve().parent / "vm"


def load_run():
    spec = importlib.util.spec_from_file_location("tcmuvm_run_report", VM / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run = load_run()


def test_vm_timeout_report_names_the_running_test_and_durations(tmp_path):
    shutil.copy(VM / "guest" / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(VM.parent / "guest_suite.py", tmp_path / "guest_suite.py")     # what the conftest imports
    (tmp_path / "test_fake_guest.py").write_text(
        "import os, signal\n"
        "def test_one():\n    pass\n"
        "def test_two():\n    pass\n"
        "def test_stuck():\n    os.kill(os.getpid(), signal.SIGKILL)   # qemu killed mid-test\n"
        "def test_never():\n    pass\n")
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", TCMUVM_GUEST="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    report = run.progress_report(p.stdout)
    lines = report.splitlines()
    assert lines[0] == "running when the guest stopped: test_fake_guest.py::test_stuck", report
    assert lines[1].startswith("2 finished"), report
    finished = sorted(line.split()[-1] for line in lines[2:])
    assert finished == ["test_fake_guest.py::test_one", "test_fake_guest.py::test_two"], report
    assert all(line.split()[1] == "s" and float(line.split()[0]) >= 0 for line in lines[2:]), report
    assert "test_never" not in report
    assert all(line.startswith("@@tcmuvm ") for line in p.stdout.splitlines() if "@@tcmuvm" in line)


def test_vm_timeout_report_from_a_captured_console():
    console = ("\x1b[0m[    0.8] booting\n..\n"
               "@@tcmuvm start tests/vm/guest/test_guest_kernel.py::test_a\n"
               ".\n@@tcmuvm done tests/vm/guest/test_guest_kernel.py::test_a 12.5s\n"
               "@@tcmuvm start tests/vm/guest/test_tcmu_handler.py::test_b[x-1]\n"
               "@@tcmuvm done tests/vm/guest/test_tcmu_handler.py::test_b[x-1] 40.0s\n"
               "[  301.2] sd 0:0:1:0: [sda] Attached SCSI disk@@tcmuvm start tests/vm/guest/test_tcmu_iscsi.py::test_c\n"
               "F\n"
               "tcmuvm: timed out after 480.0 s; qemu killed (481.2 s)\n")
    assert run.progress_report(console).splitlines() == [
        "running when the guest stopped: tests/vm/guest/test_tcmu_iscsi.py::test_c",
        "2 finished, 52.5 s in all (slowest first):",
        "     40.0 s  tests/vm/guest/test_tcmu_handler.py::test_b[x-1]",
        "     12.5 s  tests/vm/guest/test_guest_kernel.py::test_a",
    ]
    assert run.progress_report("no markers at all\n") == ""
    done = run.progress_report("@@tcmuvm start t::a\n@@tcmuvm done t::a 1.0s\n")
    assert done.splitlines()[0] == "no test was running when the guest stopped"


def test_vm_timeout_from_env(monkeypatch):
    monkeypatch.delenv("TCMU_OBD_VM_TIMEOUT", raising=False)
    monkeypatch.delenv("VM_TIMEOUT", raising=False)
    assert run.timeout_from_env(480) == 480
    monkeypatch.setenv("VM_TIMEOUT", "600")
    assert run.timeout_from_env(480) == 600
    monkeypatch.setenv("TCMU_OBD_VM_TIMEOUT", "900.5")
    assert run.timeout_from_env(480) == 900.5               # the new name wins
    for bad in ("", "ten", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("TCMU_OBD_VM_TIMEOUT", bad)
        with pytest.raises(ValueError, match=f"TCMU_OBD_VM_TIMEOUT={bad!r}: the guest time limit"):
            run.timeout_from_env(480)
