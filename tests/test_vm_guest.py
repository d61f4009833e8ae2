"""The guest test suite (tests/vm/guest), run in ONE throw-away qemu guest.

The host kernel has no TCMU (no CONFIG_MODULES); the guest boots Debian's
kernel under TCG with target_core_user and tcm_loop loaded (tests/vm/README.md).
Needs qemu-system-x86, busybox-static, kmod, libtcmu2, tcmu-runner and
sg3-utils: scripts/setup.sh installs them.  Select or skip with `-m vm` /
`-m "not vm"`.  TCMU_OBD_VM_TIMEOUT (seconds, default 480; the older name
VM_TIMEOUT also works) bounds the whole guest run; when it runs out, or the
suite fails, the report names the test that was running and how long each
finished test took (from the guest's progress lines).
"""
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

VM_DIR = Path(__file__).resolve().parent / "vm"
GUEST_CMD = "$TCMUVM_PYTHON -m pytest -q -p no:cacheprovider tests/vm/guest"


def _load(name):
    mod = sys.modules.get(f"tcmuvm_{name}")
    if mod is None:
        spec = importlib.util.spec_from_file_location(f"tcmuvm_{name}", VM_DIR / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


def test_guest_suite():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/setup.sh "
                    "(it installs qemu-system-x86 busybox-static kmod libtcmu2 tcmu-runner sg3-utils)")
    prepare = _load("prepare")
    try:
        prepare.ensure()
    except prepare.PrepareError as e:
        pytest.fail(f"preparing the guest kernel failed: {e}")
    run = _load("run")
    try:
        timeout = run.timeout_from_env(480)
    except ValueError as e:
        pytest.fail(str(e))
    # Plugin autoload (hypothesis, pytest-benchmark) costs tens of seconds under TCG;
    # the guest suite needs none of them.
    rc, console = run.run_in_vm(GUEST_CMD, timeout=timeout,
                                env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    summary = [line for line in console.splitlines()
               if re.search(r"\b(passed|failed|error|errors|no tests ran)\b.* in [0-9.]+s", line)]
    tail = [line for line in console.splitlines() if "@@tcmuvm " not in line][-60:]
    assert rc == 0, (f"guest suite exited {rc}"
                     + (f": {summary[-1].strip()}" if summary else " without a pytest summary")
                     + (f" (time limit {timeout:g} s: TCMU_OBD_VM_TIMEOUT)" if rc == run.GUEST_DIED else "")
                     + "\n--- progress ---\n" + (run.progress_report(console) or "no progress lines")
                     + "\n--- guest console (tail) ---\n" + "\n".join(tail))
    assert summary, "the guest run printed no pytest summary line"
