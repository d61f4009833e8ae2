"""What the two suites that run inside the tcmuvm guest (tests/vm/guest and
tests/e2e) share in their conftests: the `@@<tag> start/done` progress lines
the host test reads from the guest console, and skipping their tests when
they are named on the host.  Each conftest makes one GuestSuite and calls it
from its own hooks (conftest hooks apply to that directory only, which a
plugin registered globally would not).  Not fixtures: those stay in each
suite's conftest."""
import time
from pathlib import Path

import pytest


class GuestSuite:
    """tag: the progress line prefix after `@@`; unit: what follows a
    finished test's seconds (the host parsers differ); here: the suite's
    directory; skip_reason: shown for its tests on the host."""

    def __init__(self, tag, here, in_guest, skip_reason, unit=""):
        self.tag = tag
        self.here = Path(here)
        self.in_guest = in_guest
        self.skip_reason = skip_reason
        self.unit = unit
        self.config = None
        self.started = {}

    def configure(self, config):
        self.config = config

    def line(self, text):
        """One `@@<tag> <text>` line on the console, flushed at once (the guest
        may be killed next); also from inside a fixture's set-up, where
        pytest's capture is lifted for it."""
        pm = self.config.pluginmanager if self.config else None
        reporter = pm.get_plugin("terminalreporter") if pm else None
        if reporter is None:
            raise RuntimeError(f"@@{self.tag} progress lines need pytest's terminal reporter")
        capman = pm.get_plugin("capturemanager")
        if capman is None:
            return self._write(reporter, text)
        with capman.global_and_fixture_disabled():
            self._write(reporter, text)

    def _write(self, reporter, text):
        tw = reporter._tw
        if tw.width_of_current_line:            # after -q's progress dots
            tw.line()
        tw.line(f"@@{self.tag} {text}")
        tw.flush()

    def logstart(self, nodeid):
        self.started[nodeid] = time.monotonic()
        self.line(f"start {nodeid}")

    def logfinish(self, nodeid):
        took = time.monotonic() - self.started.pop(nodeid, time.monotonic())
        self.line(f"done {nodeid} {took:.1f}{self.unit}")

    def skip_outside_guest(self, items):
        """Named explicitly on the host (collect_ignore does not stop that): skip, don't fail."""
        if self.in_guest:
            return
        skip = pytest.mark.skip(reason=self.skip_reason)
        for item in items:
            if self.here in Path(str(item.fspath)).resolve().parents:
                item.add_marker(skip)
