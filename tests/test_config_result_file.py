"""Opening a device from config.v1.json reports every outcome in its
resultFile: `success`, or `failed:<reason>` naming the file and the cause for
any failure at all (a missing file, EPERM/EACCES, a corrupt layer, a bug),
with everything opened before the failure closed again (counted in
/proc/self/fd).  A resultFile that cannot be written is logged, and an upper
with only one of data/index is refused, not served read-only."""
import errno
import json
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import traceback

import pytest

from tcmu_obd.image import assemble, baselayer, config
from tcmu_obd.serve import handler
from tcmu_obd.errors import ConfigError, FormatError, ReadError, UnsupportedError
from tcmu_obd.image.rw import RWLayer


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


@pytest.fixture
def work(tmp_path):
    """Two real lowers (the bundled base layer and a copy) and a real RW upper."""
    lower2 = tmp_path / "lower2.commit"
    shutil.copy(baselayer.path(), lower2)
    RWLayer.create(tmp_path / "upper.data", tmp_path / "upper.index", 64 << 30).close()
    return tmp_path


def write_cfg(d, lowers=None, upper=None, **extra):
    doc = {"lowers": [{"file": str(p)} for p in (lowers if lowers is not None
                                                 else [baselayer.path(), d / "lower2.commit"])],
           "upper": upper if upper is not None else {"data": str(d / "upper.data"),
                                                      "index": str(d / "upper.index")},
           "resultFile": str(d / "result"), **extra}
    path = d / "config.v1.json"
    path.write_text(json.dumps(doc))
    return path


def open_fails(cfg, exc=Exception):
    """open_image(cfg) fails with `exc`, leaves no descriptor open and writes
    `failed:` + the error's message to the resultFile.  Returns that text."""
    before = open_fds()
    with pytest.raises(exc) as info:
        assemble.open_image(cfg)
    assert open_fds() == before
    text = (cfg.parent / "result").read_text()
    assert text.startswith("failed:"), text
    return text, info.value


def test_config_result_file_success(work):
    cfg = write_cfg(work)
    with assemble.open_image(cfg) as image:
        assert image.writable
    assert (work / "result").read_text() == "success"


def test_config_result_file_missing_upper_data(work):
    os.unlink(work / "upper.data")
    text, err = open_fails(write_cfg(work), ReadError)
    assert text == f"failed:{err}"
    assert f"upper.data = '{work / 'upper.data'}': cannot open: No such file or directory" in text


def test_config_result_file_missing_upper_index(work):
    os.unlink(work / "upper.index")
    text, _ = open_fails(write_cfg(work), ReadError)
    assert f"upper.index = '{work / 'upper.index'}': cannot open: No such file or directory" in text


def test_config_result_file_upper_not_permitted(work):
    """EPERM for real as root: the data file is immutable, and the RW layer
    opens it O_RDWR."""
    data = work / "upper.data"
    if subprocess.run(["chattr", "+i", str(data)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        text, _ = open_fails(write_cfg(work), ReadError)
    finally:
        subprocess.run(["chattr", "-i", str(data)], check=True)
    assert f"upper.data = '{data}': cannot open: Operation not permitted" in text


@pytest.fixture
def world_dir():
    """A directory user nobody can reach (pytest's tmp dirs are 0700)."""
    d = tempfile.mkdtemp(prefix="obd-eacces-", dir="/tmp")
    os.chmod(d, 0o777)
    yield pathlib.Path(d)
    shutil.rmtree(d)


def test_config_result_file_lower_access_denied(world_dir):
    """EACCES for real: a child drops root (setuid nobody) and opens a
    config whose second lower has mode 000."""
    work = world_dir
    shutil.copy(baselayer.path(), work / "lower1.commit")
    shutil.copy(baselayer.path(), work / "lower2.commit")
    os.chmod(work / "lower1.commit", 0o644)
    os.chmod(work / "lower2.commit", 0)
    cfg = write_cfg(work, lowers=[work / "lower1.commit", work / "lower2.commit"], upper={})
    os.chmod(cfg, 0o644)
    pid = os.fork()
    if pid == 0:                                   # child: no pytest machinery from here on
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            before = open_fds()
            try:
                assemble.open_image(cfg)
            except FormatError:
                code = 0 if open_fds() == before else 2
        except BaseException:                       # noqa: BLE001 - reported to the parent
            with open(work / "child-error", "w") as f:
                traceback.print_exc(file=f)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    err = (work / "child-error").read_text() if (work / "child-error").exists() else ""
    assert os.waitstatus_to_exitcode(status) == 0, err
    text = (work / "result").read_text()
    assert text == f"failed:{work / 'lower2.commit'}: file = '{work / 'lower2.commit'}': " \
                   "cannot open: Permission denied"


def test_config_result_file_corrupt_lower(work):
    with open(work / "lower2.commit", "r+b") as f:
        f.write(b"X")                               # the LSMT (or tar) magic
    text, err = open_fails(write_cfg(work), FormatError)
    assert text == f"failed:{err}" and str(work / "lower2.commit") in text


def test_config_result_file_directory_as_lower(work):
    os.unlink(work / "lower2.commit")
    os.mkdir(work / "lower2.commit")
    text, _ = open_fails(write_cfg(work), ReadError)
    assert text == f"failed:{work / 'lower2.commit'}: cannot read: Is a directory"


def test_config_result_file_missing_lower(work):
    os.unlink(work / "lower2.commit")
    text, _ = open_fails(write_cfg(work), ConfigError)
    assert "lowers[1]" in text and str(work / "lower2.commit") in text


def test_config_result_file_unexpected_exception(work, monkeypatch):
    """A bug after every layer is open: the real Image constructor is wrapped
    to raise; the lowers and the upper are closed and the reason is written."""
    real = assemble.Image

    def buggy(lowers, upper=None):
        real(lowers, upper)                         # the real stack is built, then the bug strikes
        raise RuntimeError("injected bug")
    monkeypatch.setattr(assemble, "Image", buggy)
    text, _ = open_fails(write_cfg(work), RuntimeError)
    assert text == "failed:unexpected error: RuntimeError: injected bug"


def test_config_result_file_oserror_names_its_file(work, monkeypatch):
    """An OSError from an unexpected place still names its file and errno."""
    real_open = assemble.RWLayer.open

    def failing(data, index):
        real_open(data, index).close()
        raise PermissionError(errno.EACCES, "Permission denied", str(index))
    monkeypatch.setattr(assemble.RWLayer, "open", staticmethod(failing))
    text, _ = open_fails(write_cfg(work), ReadError)
    assert "upper.index" in text and "Permission denied" in text


@pytest.mark.parametrize("have,missing", [("data", "index"), ("index", "data")])
def test_config_result_file_upper_half_given(work, have, missing):
    cfg = write_cfg(work, upper={have: str(work / f"upper.{have}")})
    text, err = open_fails(cfg, ConfigError)
    assert f"upper.{missing} missing" in str(err) and f"upper.{have} = " in str(err)
    assert text == f"failed:{err}"
    with pytest.raises(ConfigError, match=rf"^{cfg}: upper.{missing} missing"):
        config.load(cfg)


@pytest.mark.parametrize("key", ["target", "gzipIndex"])
def test_config_result_file_warp_upper_refused(work, key):
    """A warp upper is the build tools' RW file; a device refuses it (the
    TurboOCI lower keys are tests/test_warp_errors.py's)."""
    cfg = write_cfg(work, upper={"data": str(work / "upper.data"),
                                 "index": str(work / "upper.index"), key: "x"})
    text, err = open_fails(cfg, UnsupportedError)
    assert f'upper.{key} = "x": warp uppers are used by the build tools only' in text   # values shown as JSON


def test_config_result_file_write_failure_logged(work, caplog):
    cfg = write_cfg(work)
    doc = json.loads(cfg.read_text())
    doc["resultFile"] = str(work / "no-such-dir" / "result")
    cfg.write_text(json.dumps(doc))
    with caplog.at_level(logging.ERROR, logger="tcmu_obd.image.assemble"):
        assemble.open_image(cfg).close()
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(msgs) == 1, msgs
    assert doc["resultFile"] in msgs[0] and "ENOENT" in msgs[0] and f"errno {errno.ENOENT}" in msgs[0]


class _DeviceStandIn:
    """Only what OverlaybdHandler.added reads before it opens the image."""

    def __init__(self, cfg):
        self.cfgstring = f"overlaybd/{cfg}"
        self.uio_name = "uio-test"


def test_config_result_file_handler_refuses_and_keeps_the_reason(work, monkeypatch):
    """The TCMU handler refuses the device (-EPERM) and leaves open_image's
    detailed reason in the resultFile."""
    os.unlink(work / "upper.index")
    cfg = write_cfg(work)
    h = handler.OverlaybdHandler(None)
    before = open_fds()
    assert h.added(_DeviceStandIn(cfg)) == -errno.EPERM
    assert open_fds() == before
    assert (work / "result").read_text().startswith(
        f"failed:{cfg}: upper.index = '{work / 'upper.index'}': cannot open")
