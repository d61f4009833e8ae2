"""The client's own tools driving tcmu-obd, in the guest (after
test_e2e_snapshotter.py, on the same stack): accelerated-container-image's
`convertor` building an image with tcmu-obd's overlaybd-create/apply/commit
(installed in /opt/overlaybd/bin) that then runs under the snapshotter, and
`ctr record-trace` recording a trace through tcmu-obd's daemon and the traced
image replaying it.  Not a test of the convertor or ctr themselves.
"""
from pathlib import Path

from e2e_stack import EXPECTED, SNAP_ROOT, checksum_script, parse_sums, sh, wait_for


def _remove_and_wait(stack, *images):
    for image in images:
        stack.ctr("images", "rm", "--sync", image)
    wait_for(lambda: not stack.devices() and not stack.loopbacks(), 120,
             f"configfs empty after removing {images}: {stack.devices()} {stack.loopbacks()}")


def test_convertor_with_tcmu_obd_tools(stack, tmp_path):
    """(h) the real convertor (--mkfs, its default) with tcmu-obd's tools; the result runs."""
    host = stack.reg.host
    sh(stack.aci / "convertor", "-r", f"{host}/src/busybox", "-i", "v1", "-o", "aci", "--plain",
           "-d", tmp_path / "conv", timeout=1800, cwd=tmp_path, env=stack.env)
    image = f"{host}/src/busybox:aci"
    stack.rpull(image)
    out = stack.run(image, "h-read", checksum_script() + "; test -e /etc/motd && echo MOTD-PRESENT; true")
    assert parse_sums(out) == EXPECTED, out + stack.logs()
    assert "MOTD-PRESENT" not in out
    _remove_and_wait(stack, image)


def test_record_trace_and_replay(stack, tmp_path):
    """(i) ctr record-trace through tcmu-obd (the .lock/.ok hand-shake), then the traced image replays."""
    stack.rpull(stack.image)
    traced = stack.image.rsplit(":", 1)[0] + ":traced"
    work = tmp_path / "trace"
    work.mkdir()
    # --runtime: record-trace's default ("io.containerd.runtime.v2", a plugin type) is no runtime
    # containerd 2 knows ("containerd-shim-runtime-v2": file does not exist); --disable-network-isolation:
    # no CNI plugins in the guest
    p = stack.ctr("record-trace", "--time", "300", "--disable-network-isolation", "--working-dir", work,
                  "--runtime", "io.containerd.runc.v2",
                  "--snapshotter", "overlaybd", stack.image, traced, "sh", "-c", checksum_script(),
                  timeout=900)
    assert "Collecting trace" in p.stdout, p.stdout + p.stderr
    # the traced image is meant to be pushed and pulled: only rpull labels its trace layer
    # as an acceleration layer (a local `ctr run` unpacks it as a plain directory layer)
    stack.ctr("images", "push", "--local", "--plain-http", traced, timeout=600)
    stack.ctr("images", "rm", "--sync", traced)
    stack.rpull(traced)
    out = stack.run(traced, "i-replay", checksum_script())
    assert parse_sums(out) == EXPECTED, out + stack.logs()
    traces = list(Path(SNAP_ROOT, "snapshots").glob("*/fs/trace"))
    assert traces and traces[0].stat().st_size > 0, (traces, stack.logs())
    configs = [c.read_text() for c in Path(SNAP_ROOT, "snapshots").glob("*/block/config.v1.json")]
    assert any('"accelerationLayer":true' in c.replace(" ", "") for c in configs), configs
    _remove_and_wait(stack, traced, stack.image)
