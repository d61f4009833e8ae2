"""Progress bars (tcmu_obd.build.progress) and their use by `tcmu-obd convert`.

Unit tests drive a Progress with a fake clock against in-memory streams, one
pretending to be a terminal: the redraw throttle (~10 a second), the final
lines, several threads updating at once, the live line fitting the width,
log records not landing inside a bar, human units and the table helper.
The end-to-end test converts the 3-layer source image of
tests/test_convert_registry.py (its fixtures, imported) on a real local
registry and checks the per-step final lines and the summary table against
the sizes the registry holds, then the reuse rows, --progress bars (redraws
even on a pipe), --progress none and --quiet."""
import gzip
import io
import json
import logging
import re
import subprocess
import threading
import time

import pytest

import test_convert_registry as tcr
from test_apply_untar import missing
from tcmu_obd.build import progress
from tcmu_obd.build.progress import Progress, human, rate, table

MiB = 1 << 20

# the module-scoped registry and source image of test_convert_registry (not copied)
reg, source = tcr.reg, tcr.source


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class TTY(io.StringIO):
    def isatty(self):
        return True


class SlowTTY(TTY):
    """Gives other threads a chance in the middle of every write."""

    def write(self, s):
        half = len(s) // 2
        super().write(s[:half])
        time.sleep(0)
        return super().write(s[half:])


def pieces(text):
    """What each redraw or line left on screen: the text between \\r and \\n."""
    return [p.rstrip(" ") for p in re.split(r"[\r\n]", text) if p.strip(" ")]


# -- units and helpers ---------------------------------------------------------------------------

def test_human_units():
    assert human(0) == "0 B"
    assert human(1023) == "1023 B"
    assert human(1024) == "1.0 KiB"
    assert human(1536) == "1.5 KiB"
    assert human(24 * MiB) == "24.0 MiB"
    assert human(1024 * MiB - 1) == "1.0 GiB"         # rounds up a unit, never "1024.0 MiB"
    assert human(3 << 40) == "3.0 TiB"
    assert human(5000 << 40) == "5000.0 TiB"


def test_rate_and_table():
    assert rate(58_500_000, 1.0) == "58.5 MB/s"
    assert rate(10, 0) == "- MB/s"
    assert table(("a", "bb"), [("xyz", "1"), ("q", "22222")]) == \
        ["a       bb", "xyz      1", "q    22222"]


def test_bad_mode():
    with pytest.raises(ValueError, match="progress mode 'fancy'"):
        Progress(io.StringIO(), mode="fancy")


def test_auto_mode_follows_isatty():
    assert Progress(TTY()).mode == "bars"
    assert Progress(io.StringIO()).mode == "lines"
    assert Progress(TTY(), quiet=True).mode == "none"


# -- not a terminal: one final line per task ---------------------------------------------------------

def test_lines_mode_prints_only_final_lines():
    out, clk = io.StringIO(), Clock()
    p = Progress(out, clock=clk, prefix="convert: ")
    bar = p.task("layer 2/3 apply", 24 * MiB)
    for _ in range(24):
        clk.t += 0.41 / 24
        bar.update(MiB)
    assert out.getvalue() == ""                     # nothing while running
    bar.close()
    bar.close()                                     # a second close changes nothing
    assert out.getvalue() == "convert: layer 2/3 apply: 24.0 MiB in 0.41 s, 61.4 MB/s\n"
    p.message("done")
    assert out.getvalue().endswith("\nconvert: done\n")


def test_final_line_variants():
    out, clk = io.StringIO(), Clock()
    p = Progress(out, clock=clk)
    with p.task("up", 100) as b:
        clk.t += 0.25
        b.skip("already in the registry")
    with pytest.raises(RuntimeError):
        with p.task("apply", 8 * MiB) as b:
            b.update(3 * MiB)
            clk.t += 0.5
            raise RuntimeError("boom")
    with p.task("fetch") as b:                      # unknown total
        b.set(2048)
        b.set_note("reused")
        clk.t += 2
    assert out.getvalue().splitlines() == [
        "up: already in the registry (0.25 s)",
        "apply: stopped after 3.0 MiB of 8.0 MiB in 0.50 s",
        "fetch: 2.0 KiB in 2.00 s, 0.0 MB/s (reused)"]


def test_quiet_and_none():
    out = io.StringIO()
    p = Progress(out, quiet=True)
    with p.task("x", 10) as b:
        b.update(10)
    p.message("hello")
    assert out.getvalue() == ""
    assert b.done == 10 and b.closed            # still counted: callers read timings from it
    p = Progress(out, mode="none")
    with p.task("x", 10) as b:
        b.update(10)
    p.message("hello")
    assert out.getvalue() == "hello\n"


# -- a terminal: one line redrawn in place ----------------------------------------------------------------

def test_redraws_are_throttled():
    out, clk = TTY(), Clock()
    p = Progress(out, clock=clk, width=120)
    bar = p.task("copy", 1_000_000)
    start = clk.t
    for k in range(1, 1001):                        # 1000 updates over one second
        clk.t = start + k / 1000
        bar.update(1000)
    draws = out.getvalue().count("\r")
    assert 9 <= draws <= 12, draws                  # ~10 a second, not 1000
    shown = pieces(out.getvalue())
    assert shown[0] == "copy [....................]   0% 0 B/976.6 KiB - MB/s 0.0 s"
    # the last redraw was at most one interval before the end
    assert re.fullmatch(r"copy \[#{17,20}\.{0,3}\] +(8[5-9]|9\d|100)% \S+ KiB/976.6 KiB 1\.0 MB/s "
                        r"(0\.9|1\.0) s", shown[-1]), shown[-1]
    bar.close()
    text = out.getvalue()
    # the final line replaces the live one (padded over it) and ends the line
    last = text[text.rindex("\r") + 1:]
    assert last.endswith("\n") and last.rstrip() == "copy: 976.6 KiB in 1.00 s, 1.0 MB/s"
    assert len(last) - 1 >= len(shown[-1])
    assert text.count("\r") == draws + 1


def test_message_goes_above_the_live_line():
    out, clk = TTY(), Clock()
    p = Progress(out, clock=clk, width=100, prefix="convert: ")
    bar = p.task("dl", 100)
    bar.update(50)                                  # throttled: same instant
    p.message("a message")
    text = out.getvalue()
    assert "\rconvert: a message" in text
    # the live line comes back below it, with the current count
    live = "dl [##########..........]  50% 50 B/100 B - MB/s 0.0 s"
    first = "dl [....................]   0% 0 B/100 B - MB/s 0.0 s"
    assert text == "\r" + first + "\r" + "convert: a message".ljust(len(first)) + "\n\r" + live
    p.close()
    assert out.getvalue().endswith("\r" + " " * len(live) + "\r")


def test_two_bars_share_the_line_and_fit_the_width():
    out, clk = TTY(), Clock()
    p = Progress(out, clock=clk, width=70)
    dl = p.task("layer 1/3 download", 30 * MiB)
    clk.t += 1
    ap = p.task("layer 1/3 apply", 30 * MiB)
    clk.t += 1
    dl.update(16 * MiB)
    clk.t += 1
    ap.update(8 * MiB)
    live = pieces(out.getvalue())
    assert all(len(s) <= 69 for s in live), live
    assert live[-1].startswith("layer 1/3 download ") and " | apply " in live[-1], live[-1]
    dl.close()
    assert pieces(out.getvalue())[-2:] == [
        "layer 1/3 download: 16.0 MiB in 3.00 s, 5.6 MB/s",
        "layer 1/3 apply [##........]  27% 8.0 MiB/30.0 MiB 4.2 MB/s 2.0 s"]     # 20 would not fit


def test_log_records_take_the_live_line_away():
    out, clk = TTY(), Clock()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        p = Progress(out, clock=clk, width=100)
        with p.logging_above():
            bar = p.task("apply", 10)
            logging.getLogger("tcmu_obd.test").warning("xattr ignored")
            clk.t += 1
            bar.update(5)
        assert not handler.filters                  # removed on the way out
    finally:
        root.removeHandler(handler)
    text = out.getvalue()
    live = "apply [....................]   0% 0 B/10 B - MB/s 0.0 s"
    assert text.startswith("\r" + live + "\r" + " " * len(live) + "\rxattr ignored\n\rapply [")


def test_threads_updating_one_bar_and_their_own():
    """Several threads update one shared bar and close bars of their own; with
    no throttle every update redraws, and the stream lets other threads run in
    the middle of a write, so lines would be cut into each other unless locked."""
    out = SlowTTY()
    p = Progress(out, width=10000, interval=0.0)        # wide: every bar keeps its graphic
    shared = p.task("shared", 8 * 500 * 3)
    errors = []

    def work(k):
        try:
            own = p.task(f"own{k}", 500)
            for _ in range(500):
                shared.update(3)
                own.update(1)
            own.close()
        except Exception as e:      # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.close()
    assert not errors
    assert shared.done == 12000
    text = out.getvalue()
    finals = re.compile(r"(own\d: 500 B|shared: 11\.7 KiB) in \d+\.\d\d s, \S+ MB/s")
    got_finals = []
    for s in pieces(text):
        if finals.fullmatch(s):
            got_finals.append(s.split(":")[0])
        else:
            # every redraw is whole: bars of equal shape joined by " | "
            assert all(re.fullmatch(r"(shared|own\d) \[[#.]{20}\] +\d+% \S+ \S+/\S+ \S+ \S+ MB/s \S+ s",
                                    part) for part in s.split(" | ")), s
    assert sorted(got_finals) == sorted([f"own{k}" for k in range(8)] + ["shared"])


def test_null_bar_counts_silently():
    b = progress.null_bar()
    b.update(7)
    b.close()
    assert b.done == 7 and b.closed and b.final.startswith(": 7 B in ")


# -- end to end: tcmu-obd convert --------------------------------------------------------------------------------

def _cells(line):
    return re.split(r" {2,}", line.split("convert: ", 1)[1].strip())


def _tar_size(reg, repo, desc):
    import zstandard
    blob = reg.get_blob(repo, desc["digest"])
    if desc["mediaType"].endswith("+gzip"):
        return len(gzip.decompress(blob))
    if desc["mediaType"].endswith("+zstd"):
        return len(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read())
    return len(blob)


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_convert_prints_steps_and_summary(reg, source, tmp_path):
    db = str(tmp_path / "layers.db")
    dst = f"{reg.host}/obd/progress:v1"
    p = tcr.cli("convert", source["ref"], dst, "--db", db)
    err = p.stderr
    assert "\r" not in err                          # stderr is a pipe: final lines only
    src = json.loads(tcr.get_manifest(reg, "src/app", "amd64-v1").content)["layers"]
    out = json.loads(tcr.get_manifest(reg, "obd/progress", "v1").content)["layers"]
    assert len(src) == 3 and len(out) == 4

    step = r"^convert: layer {i}/3 {step}: (\S+ \S+) in (\d+\.\d\d) s, (\d+\.\d) MB/s(.*)$"
    for i, (sd, od) in enumerate(zip(src, out[1:]), 1):
        got = {}
        for name in ("download", "apply", "compress", "upload"):
            m = re.search(step.format(i=i, step=name), err, re.M)
            assert m, (name, err)
            got[name] = m.groups()
        tar = _tar_size(reg, "src/app", sd)
        assert got["download"][0] == human(sd["size"]) == got["apply"][0]
        assert f"-> {human(tar)} tar, " in got["apply"][3]
        assert got["compress"][3] == f" (-> {human(od['size'])} lz4 blob)"
        assert got["upload"][0] == human(od["size"])
        # the step lines come in order: download, apply, compress, upload
        at = [err.index(f"layer {i}/3 {name}:") for name in ("download", "apply", "compress", "upload")]
        assert at == sorted(at)
        row = [line for line in err.splitlines() if line.startswith(f"convert: {i}/3 ")]
        assert len(row) == 1, err
        cells = _cells(row[0])
        assert cells[:5] == [f"{i}/3", human(sd["size"]), human(tar), human(od["size"]), "no"], cells
        assert all(re.fullmatch(r"\d+\.\d\d s", c) for c in cells[5:]) and len(cells) == 9, cells

    lines = err.splitlines()
    head = [line for line in lines if line.startswith("convert: layer ") and ":" not in line[9:]]
    assert [_cells(h) for h in head] == [["layer", "source", "tar", "overlaybd", "reused", "download",
                                          "apply", "compress", "upload"]]
    base = _cells([line for line in lines if line.startswith("convert: base  ")][0])
    assert base[:5] == ["base", "-", "-", human(out[0]["size"]), "no"]
    total = _cells([line for line in lines if line.startswith("convert: total ")][0])
    assert total[:5] == ["total", human(sum(d["size"] for d in src)),
                         human(sum(_tar_size(reg, "src/app", d) for d in src)),
                         human(sum(d["size"] for d in out)), "0/3"]
    assert re.search(r"summary: 3 layers \(3 converted, 0 reused\) \+ base layer; .* "
                     r"\d+\.\d MB/s of tar overall$", err, re.M), err
    # the table comes after every step line
    assert err.index("convert: total ") > err.rindex("layer 3/3 upload:")

    # again: every layer from the database; no step lines, the rows say so
    p = tcr.cli("convert", source["ref"], dst, "--db", db)
    assert "layer 1/3 apply:" not in p.stderr
    for i in (1, 2, 3):
        row = _cells([line for line in p.stderr.splitlines() if line.startswith(f"convert: {i}/3 ")][0])
        assert row[2:5] == ["-", human(out[i]["size"]), "db"] and row[5:] == ["-"] * 4
    assert "base layer upload: already in the registry" in p.stderr
    assert _cells([line for line in p.stderr.splitlines() if line.startswith("convert: base  ")][0])[4] \
        == "present"
    total = _cells([line for line in p.stderr.splitlines() if line.startswith("convert: total ")][0])
    assert total[4] == "3/3"

    # --quiet: nothing on stderr, the reference on stdout
    p = tcr.cli("convert", source["ref"], dst, "--db", db, "--quiet")
    assert p.stderr == "" and p.stdout.strip().startswith(dst + "@sha256:")


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_convert_progress_modes(reg, source, tmp_path):
    dst = f"{reg.host}/obd/progress:modes"
    # bars even on a pipe when asked: redraws with \r, the final lines still there
    # (bytes: text mode would turn every \r into \n)
    p = subprocess.run(tcr.CLI + ["convert", source["ref"], dst, "--no-reuse", "--progress", "bars"],
                       capture_output=True, timeout=180, cwd=tcr.ROOT)
    raw = p.stderr.decode()
    assert p.returncode == 0, raw
    assert "\r" in raw
    assert re.search(r"\rlayer 2/3 (download|apply|compress|upload) ", raw), raw
    text = raw.replace("\r", "\n")
    for name in ("download", "apply", "compress", "upload"):
        assert re.search(rf"^convert: layer 3/3 {name}: ", text, re.M), (name, raw)
    assert "convert: total " in text
    # none: the per-layer lines and the table, no step lines
    p = tcr.cli("convert", source["ref"], dst, "--no-reuse", "--progress", "none")
    assert "\r" not in p.stderr and " apply:" not in p.stderr and "upload:" not in p.stderr
    assert "convert: [3/3] sha256:" in p.stderr and "convert: total " in p.stderr
