"""configfs.daemon_pids(): which running processes count as an overlaybd TCMU
daemon.  The tools (apply, create --mkfs, run) attach through a running daemon
when there is one and start a private one otherwise; a daemon they fail to see
would answer the same kernel events as the private one, and the device fails
("could not open /dev/uioN").  Real processes with the argv each way of
starting the daemon has; not a test of the daemon itself.
"""
import subprocess
import sys
import time

import pytest

from tcmu_obd.serve.configfs import daemon_pids

SLEEP = "import time; time.sleep(120)"


def _spawn(*extra):
    # python -c stops option parsing: `extra` lands in argv (and /proc/PID/cmdline) as given
    p = subprocess.Popen([sys.executable, "-c", SLEEP, *extra])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[1:2] == [b"-c"]:
                break
        time.sleep(0.01)
    return p


@pytest.mark.parametrize("argv", [
    ("-m", "tcmu_obd", "serve"),                       # python -m tcmu_obd serve
    ("-m", "tcmu_obd", "serve", "/etc/overlaybd/overlaybd.json"),
    ("-m", "tcmu_obd.cli.serve",),                    # the module itself
    ("/usr/local/bin/tcmu-obd", "serve"),             # the console script
    ("/opt/overlaybd/bin/overlaybd-tcmu",),           # the install wrapper / overlaybd's own
])
def test_daemon_pids_sees_every_way_of_starting_the_daemon(argv):
    p = _spawn(*argv)
    try:
        assert p.pid in daemon_pids(), argv
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("argv", [
    ("-m", "tcmu_obd", "convert", "a", "b"),           # a tool, not the daemon
    ("-m", "tcmu_obd", "run", "serve"),                # "serve" as an argument of another subcommand
    ("-m", "tcmu_obd", "attach", "/x/serve"),
    ("tcmu-obd", "detach", "5"),
    ("/usr/local/bin/tcmu-obd", "run", "x", "--cat", "serve"),
])
def test_daemon_pids_ignores_the_tools(argv):
    p = _spawn(*argv)
    try:
        assert p.pid not in daemon_pids(), argv
    finally:
        p.kill()
        p.wait()
