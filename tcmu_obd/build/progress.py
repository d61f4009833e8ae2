"""Progress display for long-running commands (tcmu-obd convert): named tasks
counting bytes, drawn as bars redrawn in place on one terminal line, or, when
the output is not a terminal (CI, pipes, tests), as one line per task when it
ends, so logs stay readable.  Also the small text helpers the summaries use
(binary sizes, MB/s, aligned tables).

It is not a logger and knows nothing about conversion: callers name the tasks
and decide what a byte is.  It draws one line only (carriage return and
spaces; no curses, no cursor movement), redrawn as counts change but at most
~10 times a second (there is no timer thread: a bar that does not move is
not redrawn), and is safe to update from several threads.

Why not tqdm or rich: what the convertor shows is several concurrent tasks
(one per layer and step) folded into one redrawn line, and, off a terminal,
one line per finished task that tests and CI logs read; tqdm draws one bar
per line with cursor movement (and on a pipe prints every refresh), rich's
live display also moves the cursor and would be a large dependency for it.
Both would keep this module's folding, line mode and logging hand-off, so
they would add a dependency without removing code.
"""
import contextlib
import logging
import os
import shutil
import sys
import threading
import time

MODES = ("auto", "bars", "lines", "none")
BAR_WIDTHS = (20, 10, 0)        # tried in turn until the live line fits the terminal


def human(n):
    """A byte count in binary units: '512 B', '1.5 KiB', '24.0 MiB'."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        # round first, so 1023.97 KiB shows as 1.0 MiB, not 1024.0 KiB
        if round(abs(n), 1) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def rate(nbytes, seconds):
    """Decimal MB/s, as disks and networks are quoted."""
    if seconds <= 0:
        return "- MB/s"
    return f"{nbytes / seconds / 1e6:.1f} MB/s"


def table(headers, rows, align=None):
    """Lines of a plain text table; `align` has one 'l' or 'r' per column
    (default: the first column left, the others right)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    ncol = len(headers)
    align = align or "l" + "r" * (ncol - 1)
    widths = [max(len(r[i]) for r in cells) for i in range(ncol)]
    out = []
    for r in cells:
        parts = [r[i].ljust(widths[i]) if align[i] == "l" else r[i].rjust(widths[i])
                 for i in range(ncol)]
        out.append("  ".join(parts).rstrip())
    return out


def null_bar():
    """A bar that shows nothing, for callers that were given none."""
    return Progress(mode="none").task("")


def _isatty(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):       # closed or not a real file
        return False


def _short_labels(labels):
    """Labels for one line: words a label shares with the one before it are
    left out ('layer 2/3 download | apply')."""
    out = labels[:1]
    for prev, lab in zip(labels, labels[1:]):
        same = os.path.commonprefix([prev + " ", lab + " "])
        cut = same.rfind(" ") + 1
        out.append(lab[cut:] or lab)
    return out


class _EraseFirst(logging.Filter):
    def __init__(self, progress):
        super().__init__()
        self.progress = progress

    def filter(self, record):
        self.progress._make_room()
        return True


class Bar:
    """One task: `total` bytes (None: unknown), `done` so far.  Made by
    Progress.task(); as a context manager it is closed on exit, as stopped
    when the block raised."""

    def __init__(self, progress, label, total):
        self._p = progress
        self.label = label
        self.total = total if total else None
        self.done = 0
        self.note = ""
        self.start = progress.clock()
        self.end = None
        self.final = ""                  # the final line, once closed

    @property
    def closed(self):
        return self.end is not None

    @property
    def elapsed(self):
        return (self.end if self.end is not None else self._p.clock()) - self.start

    def update(self, n):
        """n more bytes done."""
        with self._p.lock:
            if self.end is None:
                self.done += n
                self._p._changed()

    def set(self, done):
        with self._p.lock:
            if self.end is None:
                self.done = done
                self._p._changed()

    def set_total(self, total):
        with self._p.lock:
            self.total = total if total else None
            self._p._changed()

    def set_note(self, text):
        """A few words shown after the figures (live, and in the final line)."""
        with self._p.lock:
            self.note = text
            self._p._changed()

    def close(self, note=None):
        """Finished: the final line is '<label>: <bytes> in <s> s, <MB/s>'."""
        self._finish(note, None)

    def skip(self, reason):
        """Finished without moving bytes: '<label>: <reason> (<s> s)'."""
        self._finish(None, reason)

    def fail(self):
        """Stopped by an error: '<label>: stopped after <bytes> [of <total>] ...'."""
        self._finish(None, "stopped")

    def _finish(self, note, reason):
        with self._p.lock:
            if self.end is not None:
                return
            self.end = self._p.clock()
            if note is not None:
                self.note = note
            self.final = self._final_text(reason)
            self._p._closed(self)

    def _final_text(self, reason):
        el = self.elapsed
        tail = f" ({self.note})" if self.note else ""
        if reason == "stopped":
            of = f" of {human(self.total)}" if self.total else ""
            return f"{self.label}: stopped after {human(self.done)}{of} in {el:.2f} s{tail}"
        if reason is not None:
            return f"{self.label}: {reason} ({el:.2f} s)"
        return f"{self.label}: {human(self.done)} in {el:.2f} s, {rate(self.done, el)}{tail}"

    def live_text(self, bar_width, label=None):
        """The bar's part of the live line."""
        el = self.elapsed
        parts = [self.label if label is None else label]
        if self.total:
            frac = min(1.0, self.done / self.total)
            if bar_width:
                k = int(frac * bar_width)
                parts.append("[" + "#" * k + "." * (bar_width - k) + "]")
            parts.append(f"{frac * 100:3.0f}%")
            parts.append(f"{human(self.done)}/{human(self.total)}")
        else:
            parts.append(human(self.done))
        parts.append(rate(self.done, el))
        parts.append(f"{el:.1f} s")
        if self.note:
            parts.append(self.note)
        return " ".join(parts)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.fail()


class Progress:
    """The display.  mode: 'bars' (redraw one line with \\r), 'lines' (a
    final line per task only), 'none' (no task output), 'auto' (bars when
    stream.isatty(), else lines).  message() prints a whole line in every
    mode unless quiet; quiet prints nothing at all.  `prefix` starts every
    printed line except the live one (which needs the room)."""

    def __init__(self, stream=None, mode="auto", quiet=False, prefix="", interval=0.1,
                 clock=time.monotonic, width=None):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: must be one of {', '.join(MODES)}")
        self.stream = stream if stream is not None else sys.stderr
        if quiet:
            mode = "none"
        elif mode == "auto":
            mode = "bars" if _isatty(self.stream) else "lines"
        self.mode = mode
        self.quiet = quiet
        self.prefix = prefix
        self.interval = interval
        self.clock = clock
        self.width = width
        # one lock for every bar's counters and every write, so lines never interleave
        self.lock = threading.RLock()
        self._open = []
        self._last_draw = None
        self._drawn = 0                  # length of the live line on screen (0: none)

    def task(self, label, total=None):
        """A new Bar of `total` bytes (None or 0: unknown)."""
        with self.lock:
            bar = Bar(self, label, total)
            self._open.append(bar)
            self._changed()
            return bar

    def message(self, text):
        """A line of its own (above the live line on a terminal)."""
        if self.quiet:
            return
        with self.lock:
            self._println(self.prefix + text)

    def close(self):
        """Take the live line off the screen (open bars stay open)."""
        with self.lock:
            self._erase()
            self._flush()

    @contextlib.contextmanager
    def logging_above(self):
        """While inside, a record that a root logger handler writes to our
        stream first takes the live line away, so warnings do not land in
        the middle of a bar; the bar comes back at its next redraw."""
        if self.mode != "bars":
            yield self
            return
        flt = _EraseFirst(self)
        handlers = [h for h in logging.getLogger().handlers
                    if getattr(h, "stream", None) is self.stream]
        for h in handlers:
            h.addFilter(flt)
        try:
            yield self
        finally:
            for h in handlers:
                h.removeFilter(flt)

    def _make_room(self):
        with self.lock:
            self._erase()
            self._flush()
            # hold the next redraw back a little: the record is written
            # after this returns, outside our lock
            self._last_draw = self.clock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- drawing (callers hold the lock) --------------------------------------------------------
    def _changed(self):
        if self.mode != "bars":
            return
        now = self.clock()
        if self._last_draw is not None and now - self._last_draw < self.interval:
            return
        self._draw(now)

    def _closed(self, bar):
        self._open.remove(bar)
        if self.mode in ("bars", "lines"):
            self._println(self.prefix + bar.final)

    def _println(self, text):
        """Replace the live line by text, then draw the live line again below."""
        if self._drawn:
            self._write("\r" + text.ljust(self._drawn) + "\n")
            self._drawn = 0
        else:
            self._write(text + "\n")
        if self.mode == "bars" and self._open:
            self._draw(self.clock())
        self._flush()

    def _draw(self, now):
        self._last_draw = now
        if not self._open:
            self._erase()
            return
        text = self._fit(self._columns() - 1)      # the last column would wrap on some terminals
        self._write("\r" + text.ljust(self._drawn))
        self._drawn = len(text)
        self._flush()

    def _fit(self, room):
        labels = _short_labels([b.label for b in self._open])
        for bw in BAR_WIDTHS:
            text = " | ".join(b.live_text(bw, lab) for b, lab in zip(self._open, labels))
            if len(text) <= room:
                return text
        return text[:max(room, 10)]

    def _erase(self):
        if self._drawn:
            self._write("\r" + " " * self._drawn + "\r")
            self._drawn = 0

    def _columns(self):
        if self.width:
            return self.width
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            return shutil.get_terminal_size().columns

    def _write(self, s):
        self.stream.write(s)

    def _flush(self):
        try:
            self.stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
