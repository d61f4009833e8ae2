"""The guest test suite (tests/vm/guest), run in ONE throw-away qemu guest.

The host kernel has no TCMU (no CONFIG_MODULES); the guest boots Debian's
kernel under TCG with target_core_user and tcm_loop loaded (tests/vm/README.md).
Needs qemu-system-x86, busybox-static, kmod, libtcmu2, tcmu-runner and
sg3-utils: scripts/setup.sh installs them.  Select or skip with `-m vm` /
`-m "not vm"`.  VM_TIMEOUT (seconds, default 480) bounds the whole guest run.
"""
import importlib.util
import os
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
    timeout = float(os.environ.get("VM_TIMEOUT", 480))
    # Plugin autoload (hypothesis, pytest-benchmark) costs tens of seconds under TCG;
    # the guest suite needs none of them.
    rc, console = run.run_in_vm(GUEST_CMD, timeout=timeout,
                                env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    summary = [line for line in console.splitlines()
               if re.search(r"\b(passed|failed|error|errors|no tests ran)\b.* in [0-9.]+s", line)]
    assert rc == 0, (f"guest suite exited {rc}"
                     + (f": {summary[-1].strip()}" if summary else " without a pytest summary")
                     + "\n--- guest console (tail) ---\n" + "\n".join(console.splitlines()[-60:]))
    assert summary, "the guest run printed no pytest summary line"
