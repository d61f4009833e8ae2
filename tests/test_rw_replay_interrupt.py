"""Long work in the core gives way to SIGTERM and Ctrl-C: the tools (tcmu-obd read and
export, overlaybd-commit) opening an upper whose index log holds millions of
records are stopped while they replay it, and exit 128+N at once, with no
half-written output.  Not about replay correctness (test_rw_index_model.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tcmu_obd.format.lsmt import HT_SPACE, SECTOR
from tcmu_obd.image.rw import RWLayer, encode_record

BLOCK = 1 << 20          # distinct records, written REPS times over (each pass rewrites them all)
REPS = 6
SPAN = 1 << 26           # sectors the records are spread over (32 GiB)
TOOLS = {"overlaybd-commit": "commit", "tcmu-obd": "main"}


@pytest.fixture(scope="module")
def big_upper(tmp_path_factory):
    """An append-only upper whose index log holds BLOCK * REPS records,
    written as bytes (no data behind them: the data file is sparse)."""
    tmp = tmp_path_factory.mktemp("bigrw")
    d, i = tmp / "data", tmp / "index"
    RWLayer.create(d, i, SPAN * SECTOR).close()
    block = b"".join(encode_record((k * 2654435761 % SPAN) & ~7, 8, 8 + 8 * k) for k in range(BLOCK))
    with open(i, "r+b") as f:
        f.seek(HT_SPACE)
        for _ in range(REPS):
            f.write(block)
    os.truncate(d, (8 + 8 * BLOCK + 8) * SECTOR)
    cfg = tmp / "config.v1.json"
    cfg.write_text(json.dumps({"lowers": [], "upper": {"data": str(d), "index": str(i)}}))
    return tmp, d, i, cfg


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime


def _holds(pid, path):
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return False


def _start_and_signal(name, args, index_path, sig):
    """Start the tool; once it holds the index open and has spent half a
    second of CPU since (reading the log takes a few milliseconds: it is
    replaying; the whole replay takes seconds), send `sig`.  Returns
    (returncode, stdout, stderr, seconds from the signal to the exit)."""
    code = f"import sys; from tcmu_obd.cli.{TOOLS[name]} import main; sys.argv[0] = {name!r}; main()"
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not _holds(p.pid, index_path):
            assert p.poll() is None, f"{name} exited ({p.returncode}) before opening the index"
            assert time.monotonic() < deadline, f"{name} did not open the index within 120 s"
            time.sleep(0.005)
        base = _cpu_seconds(p.pid)
        while _cpu_seconds(p.pid) - base < 0.5:
            assert p.poll() is None, f"{name} exited ({p.returncode}) before it was half a second into the replay"
            assert time.monotonic() < deadline, f"{name} did not get the CPU within 120 s"
            time.sleep(0.01)
        p.send_signal(sig)
        t0 = time.monotonic()
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running 30 s after {sig.name} (mid-replay)")
        return p.returncode, out, err, time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("name,args", [
    ("tcmu-obd", ["read", "{cfg}", 0, 512]),
    ("tcmu-obd", ["export", "{cfg}", "{out}"]),
    ("overlaybd-commit", ["{data}", "{index}", "{out}"]),
])
def test_sigterm_mid_replay_stops_the_tool(big_upper, name, args):
    tmp, d, i, cfg = big_upper
    out = tmp / f"out-{name}-{args[0]}"
    args = [str(a).format(cfg=cfg, out=out, data=d, index=i) for a in args]
    rc, stdout, stderr, waited = _start_and_signal(name, args, i, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, (rc, stderr)
    assert b"SIGTERM: stopped, cleaned up" in stderr, stderr
    assert waited < 2.0, f"{name} took {waited:.2f} s to stop after SIGTERM"
    assert stdout == b""                      # stopped before it read anything
    assert not out.exists()                   # no half-written output left behind


def test_ctrl_c_mid_replay_stops_the_tool(big_upper):
    """Ctrl-C (SIGINT) is the KeyboardInterrupt the tools turn into exit 130."""
    tmp, d, i, cfg = big_upper
    rc, stdout, stderr, waited = _start_and_signal("tcmu-obd", ["read", str(cfg), "0", "512"], i, signal.SIGINT)
    assert rc == 128 + signal.SIGINT, (rc, stderr)
    assert waited < 2.0, f"tcmu-obd took {waited:.2f} s to stop after SIGINT"
    assert stdout == b""
