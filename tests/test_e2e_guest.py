"""The end-to-end suite (tests/e2e): containerd 2 and accelerated-container-image's
overlaybd-snapshotter, built from their published Go modules, driving tcmu-obd
in ONE throw-away qemu guest (tests/vm/README.md).

Builds (or reuses) the pinned client with scripts/build-e2e.sh, then boots the
guest running `pytest tests/e2e` with TCMU_OBD_E2E_BIN set to the build.  Needs
Go (first build only), qemu and the tcmuvm packages (scripts/setup.sh), runc
and docker-registry.  Marker `e2e`: select with `-m e2e`, skip with
`-m "not e2e"`; it skips unless selected that way or TCMU_OBD_E2E=1.
TCMU_OBD_E2E_TIMEOUT (seconds, default 2700) bounds the guest run;
TCMU_OBD_E2E_K passes a `-k` expression to the guest's pytest (one case while
working on it).  It checks
what the client sees (files, checksums, devices in configfs), not tcmu-obd's
internals, which the host suite covers.
"""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
VM_DIR = ROOT / "tests" / "vm"
GUEST_CMD = "$TCMUVM_PYTHON -m pytest -q -p no:cacheprovider -rs tests/e2e"


def _load(name):
    mod = sys.modules.get(f"tcmuvm_{name}")
    if mod is None:
        spec = importlib.util.spec_from_file_location(f"tcmuvm_{name}", VM_DIR / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


def case_times(console):
    """[(case, seconds)] from the guest's `@@e2e done <case> <s>` lines."""
    return [(m.group(1), float(m.group(2)))
            for m in re.finditer(r"^@@e2e done (\S+) ([0-9.]+)\s*$", console, re.M)]


def timeout_from_env(default=2700.0):
    """TCMU_OBD_E2E_TIMEOUT in seconds; ValueError naming the variable and its value."""
    text = os.environ.get("TCMU_OBD_E2E_TIMEOUT")
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise ValueError(f"TCMU_OBD_E2E_TIMEOUT={text!r}: must be a positive number of seconds")
    return value


def test_e2e_guest_suite(request):
    if "e2e" not in (request.config.getoption("markexpr") or "") and os.environ.get("TCMU_OBD_E2E") != "1":
        pytest.skip("opt-in (builds Go programs, about half an hour under TCG): "
                    "python -m pytest -m e2e tests/test_e2e_guest.py, or TCMU_OBD_E2E=1")
    for tool in ("qemu-system-x86_64", "runc", "docker-registry"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            pytest.fail(f"{tool} is missing: run scripts/setup.sh and `apt-get install runc`")
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(ROOT / "scripts" / "build-e2e.sh")], capture_output=True, text=True)
    assert p.returncode == 0, f"scripts/build-e2e.sh failed:\n{p.stderr[-4000:]}"
    bindir = p.stdout.strip().splitlines()[-1]
    build_s = time.monotonic() - t0
    prepare = _load("prepare")
    try:
        prepare.ensure()
    except prepare.PrepareError as e:
        pytest.fail(f"preparing the guest kernel failed: {e}")
    run = _load("run")
    try:
        timeout = timeout_from_env()
    except ValueError as e:
        pytest.fail(str(e))
    t1 = time.monotonic()
    cmd = GUEST_CMD
    select = os.environ.get("TCMU_OBD_E2E_K")
    if select:
        cmd += " -k " + shlex.quote(select)
    rc, console = run.run_in_vm(cmd, timeout=timeout, mem=2048,
                                env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "TCMU_OBD_E2E_BIN": bindir})
    vm_s = time.monotonic() - t1
    times = case_times(console)
    print(f"\n@@e2e build {build_s:.1f} s, guest run {vm_s:.1f} s")
    for case, s in times:
        print(f"@@e2e case {case} {s:.1f} s")
    summary = [line for line in console.splitlines()
               if re.search(r"\b(passed|failed|error|errors|no tests ran)\b.* in [0-9.]+s", line)]
    started = re.findall(r"^@@e2e start (\S+)", console, re.M)
    done = {c for c, _ in times}
    running = [c for c in started if c not in done]
    tail = [line for line in console.splitlines() if "@@e2e " not in line][-80:]
    assert rc == 0, (f"e2e guest suite exited {rc}"
                     + (f": {summary[-1].strip()}" if summary else " without a pytest summary")
                     + (f" (time limit {timeout:g} s: TCMU_OBD_E2E_TIMEOUT; running: {running})"
                        if rc == run.GUEST_DIED else "")
                     + "\n--- guest console (tail) ---\n" + "\n".join(tail))
    assert summary, "the guest run printed no pytest summary line"
