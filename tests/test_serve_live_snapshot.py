"""The live snapshot (serviceConfig's /snapshot API) on the host: the HTTP
server (tcmu_obd.serve.snapshot_api) in-process on 127.0.0.1, wired to the
real TCMU handler (tcmu_obd.serve.handler) serving real image files, with
SCSI READ/WRITE going through the ring's own dispatch (_tcmu.run_cdb, the
GIL-free core read included).  The host has no TCMU, so the kernel's device
is a stand-in holding what the handler gives it; everything under it is
real.  The guest runs the daemon under TCMU (tests/e2e).

Checked: every response code with overlaybd's exact body; a snapshot under
concurrent writes and reads (every acknowledged write readable after, the
sealed layer a valid sealed LSMT holding a prefix of each writer's writes,
no read ever torn across the restack); the config renamed over and a reopen
giving the same bytes; failures leaving the old stack serving; sequences of
writes, discards, snapshots and reopens against a bytearray model; the port
in use refused at start-up.
"""
import errno
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_obd import service_config
from tcmu_obd.errors import UsageError
from tcmu_obd.format import lsmt
from tcmu_obd.image import assemble
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer
from tcmu_obd.image.snapshot import take_snapshot
from tcmu_obd.image.stack import Image
from tcmu_obd.serve import _tcmu, handler, snapshot_api

SECTOR = 512
VSIZE = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_REQUEST = b'{"success": false, "message": "Missing dev_id or config in snapshot request"}'
NOT_FOUND = b'{"success": false, "message": "Image file not found"}'
FAILED = b'{"success": false, "message": "Failed to create snapshot`"}'
DONE = b'{"success": true, "message": "Snapshot created successfully"}'


# ------------------------------------------------------------------ files
def _new_upper(d, name, vsize=VSIZE, sparse=False):
    data, index = os.path.join(d, name + ".data"), os.path.join(d, name + ".index")
    RWLayer.create(data, index, vsize, sparse=sparse).close()
    return {"data": data, "index": index}


def make_device_files(d, lower_bytes=b"L" * 8192):
    """A sealed lower holding `lower_bytes` at 0, an empty upper, and the config."""
    low = RWLayer.create(os.path.join(d, "lower.data"), os.path.join(d, "lower.index"), VSIZE)
    low.write(lower_bytes, 0)
    low.seal()
    low.close()
    doc = {"lowers": [{"file": os.path.join(d, "lower.data")}], "upper": _new_upper(d, "upper0"),
           "resultFile": os.path.join(d, "result")}
    cfg = os.path.join(d, "config.v1.json")
    with open(cfg, "w") as f:
        json.dump(doc, f)
    return cfg


def next_config(cfg, d, name, **upper_kw):
    """What a caller prepares: a new upper (overlaybd-create) and a config
    with the current upper's data file as the top lower."""
    with open(cfg) as f:
        doc = json.load(f)
    doc["lowers"] = doc["lowers"] + [{"file": doc["upper"]["data"]}]
    doc["upper"] = _new_upper(d, name, **upper_kw)
    path = os.path.join(d, name + ".json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


# ------------------------------------------------------------------ the device
class _KernelDevice:
    """What OverlaybdHandler.added/removed use of a TCMU device (its cfgstring,
    geometry, ring start).  The host has no TCMU; commands go through
    _tcmu.run_cdb with the Backend the handler started the ring with."""

    def __init__(self, cfg, dev_id):
        self.cfgstring = f"overlaybd/{cfg};{dev_id}" if dev_id else f"overlaybd/{cfg}"
        self.uio_name = f"uio-{dev_id}"
        self.wwn = ""
        self.user = None
        self.backend = None

    def set_geometry(self, num_lbas, *rest):
        self.num_lbas = num_lbas

    def start(self, backend, inline_max=0):
        self.backend = backend

    def stats(self):
        return {}


def scsi_write(dev, offset, data):
    lba, n = offset // SECTOR, len(data) // SECTOR
    cdb = bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + n.to_bytes(2, "big") + bytes([0])
    st, _, sense = _tcmu.run_cdb(dev.backend, dev.num_lbas, True, cdb, bytes(data))
    assert st == 0, (st, sense)


def scsi_read(dev, offset, length):
    lba, n = offset // SECTOR, length // SECTOR
    cdb = bytes([0x28, 0]) + lba.to_bytes(4, "big") + bytes([0]) + n.to_bytes(2, "big") + bytes([0])
    st, data, sense = _tcmu.run_cdb(dev.backend, dev.num_lbas, True, cdb, b"", length)
    assert st == 0, (st, sense)
    return data


class Served:
    """A real handler serving one device with a dev_id, and the real API server."""

    def __init__(self, d, dev_id="7"):
        self.dir = d
        self.cfg = make_device_files(d)
        self.handler = handler.OverlaybdHandler(None)
        self.dev = _KernelDevice(self.cfg, dev_id)
        assert self.handler.added(self.dev) == 0
        self.api = snapshot_api.SnapshotApi("127.0.0.1", 0, self.handler.snapshot).start()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.api.port, timeout=60)

    @property
    def image(self):
        return self.dev.backend.image

    def request(self, query, method="POST", path="/snapshot"):
        """(status, body) over one kept-alive connection."""
        self.conn.request(method, path + ("?" + query if query else ""))
        r = self.conn.getresponse()
        body = r.read()
        assert not r.will_close, "the server closed a keep-alive connection"
        return r.status, body

    def snapshot(self, new_cfg, dev_id="7"):
        return self.request(urllib.parse.urlencode({"dev_id": dev_id, "config": new_cfg}))

    def close(self):
        self.conn.close()
        self.api.stop()
        self.handler.removed(self.dev)


@pytest.fixture
def served(tmp_path):
    s = Served(str(tmp_path))
    yield s
    s.close()


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------ response codes
def test_serve_live_snapshot_missing_arguments_400(served):
    for query in ("", "dev_id=7", "config=/x", "dev_id=&config=/x", "dev_id=7&config="):
        for method in ("GET", "POST", "PUT", "DELETE"):
            assert served.request(query, method) == (400, BAD_REQUEST), (query, method)


def test_serve_live_snapshot_unknown_dev_id_404(served):
    new = next_config(served.cfg, served.dir, "upper1")
    assert served.snapshot(new, dev_id="8") == (404, NOT_FOUND)
    assert os.path.exists(new) and served.image.upper.data_path.endswith("upper0.data")


def test_serve_live_snapshot_device_without_dev_id_not_found(tmp_path):
    """Only a cfgstring with `;<dev_id>` makes a device reachable (the snapshotter
    attaches without one; overlaybd-attacher --with-devid gives one)."""
    s = Served(str(tmp_path), dev_id="")
    try:
        assert s.snapshot(next_config(s.cfg, s.dir, "upper1"), dev_id="7") == (404, NOT_FOUND)
        assert s.handler.images == {}
    finally:
        s.close()


def test_serve_live_snapshot_other_path_404(served):
    status, body = served.request("dev_id=7&config=/x", path="/metrics")
    assert status == 404 and b"/snapshot" in body


def _bad_configs(served):
    """(name, path of a new config the snapshot must refuse, words the log names)."""
    d, cfg = served.dir, served.cfg
    doc = json.load(open(cfg))
    out = []

    def put(name, new_doc):
        p = os.path.join(d, name + ".json")
        with open(p, "w") as f:
            json.dump(new_doc, f)
        return p

    out.append(("missing file", os.path.join(d, "no-such.json"), "no-such.json"))
    broken = os.path.join(d, "broken.json")
    with open(broken, "w") as f:
        f.write("{not json")
    out.append(("not json", broken, "broken.json"))
    out.append(("no upper", put("no-upper", {"lowers": doc["lowers"]}), "upper"))
    same_index = dict(doc, upper={"data": _new_upper(d, "x1")["data"], "index": doc["upper"]["index"]})
    out.append(("same index", put("same-index", same_index), "upper.index"))
    same_data = dict(doc, upper={"data": doc["upper"]["data"], "index": _new_upper(d, "x2")["index"]})
    out.append(("same data", put("same-data", same_data), "upper.data"))
    out.append(("upper files missing", put("gone", dict(doc, upper={"data": os.path.join(d, "gone.data"),
                                                                     "index": os.path.join(d, "gone.index")})),
                "gone.data"))
    out.append(("sparse new upper", put("sparse", dict(doc, upper=_new_upper(d, "sp", sparse=True))), "sparse"))
    out.append(("other size", put("size", dict(doc, upper=_new_upper(d, "big", vsize=2 * VSIZE))),
                "virtual size"))
    return out


def test_serve_live_snapshot_refused_500_leaves_the_old_stack(served, caplog):
    scsi_write(served.dev, 4096, b"A" * 4096)
    cfg_before = _read_file(served.cfg)
    old_upper = served.image.upper
    for name, new, words in _bad_configs(served):
        caplog.clear()
        assert served.snapshot(new) == (500, FAILED), name
        assert any(words in r.getMessage() for r in caplog.records), (name, [r.getMessage() for r in caplog.records])
        assert served.image.upper is old_upper and len(served.image.lowers) == 1, name
        assert _read_file(served.cfg) == cfg_before, name
        # the device goes on: the write lands in the old upper and reads back
        scsi_write(served.dev, 8192, name.encode().ljust(SECTOR, b"."))
        assert scsi_read(served.dev, 8192, SECTOR) == name.encode().ljust(SECTOR, b".")
    assert scsi_read(served.dev, 4096, 4096) == b"A" * 4096
    # and a good snapshot afterwards works (the refused ones left nothing behind)
    assert served.snapshot(next_config(served.cfg, served.dir, "upper1")) == (200, DONE)
    assert scsi_read(served.dev, 0, 4096) == b"L" * 4096


def test_serve_live_snapshot_read_only_device_500(tmp_path):
    d = str(tmp_path)
    cfg = make_device_files(d)
    doc = json.load(open(cfg))
    upper = doc.pop("upper")
    with open(cfg, "w") as f:
        json.dump(doc, f)
    new = os.path.join(d, "new.json")
    with open(new, "w") as f:
        json.dump(dict(doc, upper=upper), f)
    h = handler.OverlaybdHandler(None)
    dev = _KernelDevice(cfg, "3")
    assert h.added(dev) == 0
    api = snapshot_api.SnapshotApi("127.0.0.1", 0, h.snapshot).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        conn.request("POST", "/snapshot?" + urllib.parse.urlencode({"dev_id": "3", "config": new}))
        r = conn.getresponse()
        assert (r.status, r.read()) == (500, FAILED)
        conn.close()
    finally:
        api.stop()
        h.removed(dev)
    with pytest.raises(UsageError, match="needs lowers and an upper"):
        with assemble.open_image(cfg) as img:
            take_snapshot(img, cfg, new)


def test_serve_live_snapshot_rename_across_file_systems_leaves_the_old_stack(served):
    """The rename is the last step before the restack: when it fails (a new
    config on another file system, EXDEV for real) the old upper, already
    sealed, keeps taking writes and a later snapshot seals it again."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(served.dir).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's directory")
    new = next_config(served.cfg, served.dir, "upper1")
    far = os.path.join(shm, f"obd-live-{os.getpid()}.json")
    with open(new) as f, open(far, "w") as g:
        g.write(f.read())
    try:
        scsi_write(served.dev, 0, b"B" * 8192)
        cfg_before = _read_file(served.cfg)
        old_upper = served.image.upper
        assert served.snapshot(far) == (500, FAILED)
        assert served.image.upper is old_upper and _read_file(served.cfg) == cfg_before
        scsi_write(served.dev, 65536, b"C" * 4096)          # over the seal's index and trailer
        assert scsi_read(served.dev, 0, 8192) == b"B" * 8192
        assert served.snapshot(new) == (200, DONE)
        assert scsi_read(served.dev, 65536, 4096) == b"C" * 4096
    finally:
        if os.path.exists(far):
            os.unlink(far)
    _check_reopen(served)


def _check_reopen(served):
    """The renamed config reopens to the bytes the device serves."""
    want = scsi_read(served.dev, 0, VSIZE)
    with assemble.open_image(served.cfg) as img:
        assert img.read(0, VSIZE) == want


def test_serve_live_snapshot_200_seals_restacks_and_renames(served):
    scsi_write(served.dev, 4096, b"1" * 8192)
    old = served.image.upper
    d = os.path.join(served.dir, "a dir with % and spaces")
    os.mkdir(d)
    new = next_config(served.cfg, d, "upper1")
    new_doc = _read_file(new)
    assert served.snapshot(new) == (200, DONE)      # the query is URL-encoded, the path decoded
    # the config renamed over the device's own
    assert not os.path.exists(new) and _read_file(served.cfg) == new_doc
    # the old upper's data file is a valid sealed LSMT holding the write
    with open_layer(old.data_path) as sealed:
        assert sealed.trailer.flags == lsmt.FLAG_DATA | lsmt.FLAG_SEALED
        assert Image([open_layer(os.path.join(served.dir, "lower.data")), sealed]).read(0, 16384) == \
            b"L" * 4096 + b"1" * 8192 + bytes(4096)
    # writes go to the new upper, the sealed file does not change
    size = os.path.getsize(old.data_path)
    scsi_write(served.dev, 0, b"2" * 4096)
    assert os.path.getsize(old.data_path) == size
    assert served.image.upper.data_path.endswith("upper1.data") and len(served.image.lowers) == 2
    assert scsi_read(served.dev, 0, 16384) == b"2" * 4096 + b"1" * 8192 + bytes(4096)
    # a second snapshot stacks again
    assert served.snapshot(next_config(served.cfg, served.dir, "upper2")) == (200, DONE)
    scsi_write(served.dev, 12288, b"3" * 512)
    assert scsi_read(served.dev, 0, 16384) == b"2" * 4096 + b"1" * 8192 + b"3" * 512 + bytes(3584)
    served.image.fsync()
    _check_reopen(served)


# ------------------------------------------------------------------ concurrency
WRITERS = 3
REGION = 64 * 1024          # each writer owns one region: its acknowledged order is the truth there


@settings(max_examples=4)
@given(plans=st.lists(st.lists(st.tuples(st.integers(0, REGION // SECTOR - 1), st.integers(1, 16)),
                               min_size=5, max_size=25), min_size=WRITERS, max_size=WRITERS),
       snap_after=st.integers(0, 10))
def test_serve_live_snapshot_under_concurrent_writes_and_reads(tmp_path_factory, plans, snap_after):
    d = str(tmp_path_factory.mktemp("live"))
    s = Served(d)
    try:
        _run_concurrently(s, plans, snap_after)
    finally:
        s.close()


def _run_concurrently(s, plans, snap_after):
    base = 4 * REGION                        # away from the lower's bytes
    lower_region = bytes(REGION)
    history = [[lower_region] for _ in range(WRITERS)]      # the region after each acknowledged write
    acked = [0] * WRITERS
    errors = []
    started = threading.Event()
    snap_marks = {}

    def writer(w):
        rnd = random.Random(w)
        model = bytearray(lower_region)
        try:
            for k, (sec, n) in enumerate(plans[w]):
                n = min(n, REGION // SECTOR - sec)
                data = bytes([rnd.randrange(1, 256)]) * (n * SECTOR)
                model[sec * SECTOR:(sec + n) * SECTOR] = data
                history[w].append(bytes(model))      # before the write: a read may see it at once
                scsi_write(s.dev, base + w * REGION + sec * SECTOR, data)
                acked[w] += 1
                if w == 0 and k == min(snap_after, len(plans[0]) - 1):
                    started.set()
        except BaseException as e:      # noqa: BLE001
            errors.append(e)
            started.set()

    def reader(w, stop):
        try:
            while not stop.is_set():
                lo = acked[w]
                got = scsi_read(s.dev, base + w * REGION, REGION)
                hi = acked[w] + 1            # one write may be in flight
                assert got in history[w][lo:hi + 1], f"writer {w}: a read matches no state {lo}..{hi}"
        except BaseException as e:      # noqa: BLE001
            errors.append(e)

    new = next_config(s.cfg, s.dir, "upper1")
    old_data = s.image.upper.data_path
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    threads += [threading.Thread(target=reader, args=(w, stop)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    started.wait()
    snap_marks["before"] = list(acked)
    status = s.snapshot(new)
    snap_marks["after"] = list(acked)
    for t in threads[:WRITERS]:
        t.join()
    stop.set()
    for t in threads[WRITERS:]:
        t.join()
    assert not errors, errors
    assert status == (200, DONE)
    # every acknowledged write is readable
    for w in range(WRITERS):
        assert scsi_read(s.dev, base + w * REGION, REGION) == history[w][-1]
    # the sealed layer (a valid sealed LSMT) holds, per writer, every write acknowledged
    # before the snapshot began and none acknowledged after it ended
    with open_layer(os.path.join(s.dir, "lower.data")) as low, open_layer(old_data) as sealed:
        ro = Image([low, sealed])
        for w in range(WRITERS):
            got = ro.read(base + w * REGION, REGION)
            lo, hi = snap_marks["before"][w], snap_marks["after"][w]
            assert got in history[w][lo:hi + 2], f"writer {w}: sealed state not in {lo}..{hi + 1}"
    s.image.fsync()
    _check_reopen(s)


# ------------------------------------------------------------------ a model
OPS = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 255), st.integers(1, 64), st.integers(1, 255)),
    st.tuples(st.just("d"), st.integers(0, 255), st.integers(1, 64)),
    st.tuples(st.just("snap")),
    st.tuples(st.just("reopen"))), max_size=30)


@settings(max_examples=25)
@given(ops=OPS)
def test_serve_live_snapshot_model(tmp_path_factory, ops):
    """Writes, discards, snapshots and reopens from the renamed config, against
    a bytearray model of the disk (4 KiB units over the first MiB)."""
    d = str(tmp_path_factory.mktemp("model"))
    cfg = make_device_files(d)
    model = bytearray(VSIZE)
    model[:8192] = b"L" * 8192
    img = assemble.open_image(cfg)
    n = 0
    try:
        for op in ops:
            if op[0] == "w":
                off, ln = op[1] * 4096, min(op[2], 256 - op[1]) * 4096
                img.write(bytes([op[3]]) * ln, off)
                model[off:off + ln] = bytes([op[3]]) * ln
            elif op[0] == "d":
                off, ln = op[1] * 4096, min(op[2], 256 - op[1]) * 4096
                img.discard(off, ln)
                model[off:off + ln] = bytes(ln)
            elif op[0] == "snap":
                n += 1
                take_snapshot(img, cfg, next_config(cfg, d, f"up{n}"))
            else:
                img.fsync()
                img.close()
                img = assemble.open_image(cfg)
            assert img.read(0, VSIZE) == model
    finally:
        img.close()
    with assemble.open_image(cfg) as again:
        assert again.read(0, VSIZE) == model
        assert len(again.lowers) == 1 + n


def test_serve_live_snapshot_restack_keeps_file_numbers(tmp_path):
    """Existing layers keep their file numbers (a background download or a
    trace recording that named one still names it); the sealed layer takes
    the next; files() stays in file-number order."""
    d = str(tmp_path)
    cfg = make_device_files(d)
    with assemble.open_image(cfg) as img:
        before = img.files()[:-1]
        tag0 = img.layer_tag(0)
        take_snapshot(img, cfg, next_config(cfg, d, "up1"))
        assert img.layer_tag(0) == tag0 and img.layer_tag(1) == len(before)
        assert img.files()[:len(before)] == before
        assert img.files() == img.stack.backings
        assert img.file_layer == [(0, 0), (1, 0)]


def test_serve_live_snapshot_core_restack_refuses_bad_tables(tmp_path):
    d = str(tmp_path)
    cfg = make_device_files(d)
    with assemble.open_image(cfg) as img:
        files = img.stack.backings
        want = img.read(0, VSIZE)
        with pytest.raises(UsageError, match="keep 9"):
            img.stack.restack(9, [], img.lower_index, None)
        with pytest.raises(UsageError, match="has tag 0, no such file"):
            img.stack.restack(0, [files[-1]], img.lower_index, img.upper.index)
        with pytest.raises(TypeError):
            img.stack.restack(1, ["not a backing"], img.lower_index, img.upper.index)
        assert img.stack.backings == files and img.read(0, VSIZE) == want


# ------------------------------------------------------------------ start-up
def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_serve_live_snapshot_port_in_use_refused():
    s = _busy_port()
    try:
        port = s.getsockname()[1]
        cfg = service_config.from_dict({"serviceConfig": {"enable": True, "address": f"http://127.0.0.1:{port}"}},
                                       source="overlaybd.json")
        with pytest.raises(UsageError) as info:
            snapshot_api.start(cfg, lambda *a: None)
        assert str(info.value).startswith(f"serviceConfig.address = 'http://127.0.0.1:{port}': cannot listen on "
                                          f"127.0.0.1:{port}: ")
        assert os.strerror(errno.EADDRINUSE) in str(info.value)
        off = service_config.from_dict({}, source="overlaybd.json")
        assert snapshot_api.start(off, lambda *a: None) is None
    finally:
        s.close()


def test_serve_live_snapshot_daemon_port_in_use_refuses_start(tmp_path):
    """`tcmu-obd serve` with the API's port taken: exit status 1 and the reason, before
    it touches TCMU (the API binds first)."""
    s = _busy_port()
    try:
        port = s.getsockname()[1]
        svc = tmp_path / "overlaybd.json"
        svc.write_text(json.dumps({"serviceConfig": {"enable": True, "address": f"http://127.0.0.1:{port}"},
                                   "logConfig": {"logPath": str(tmp_path / "log")}, "enableAudit": False}))
        r = subprocess.run([sys.executable, "-m", "tcmu_obd", "serve", "--service-config", str(svc), "--dbus", "no",
                            "--pid-file", str(tmp_path / "pid")], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=REPO))
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert f"serviceConfig.address = 'http://127.0.0.1:{port}': cannot listen" in r.stderr, r.stderr
        assert os.strerror(errno.EADDRINUSE) in r.stderr
    finally:
        s.close()


def test_serve_live_snapshot_reads_never_mix_stacks(tmp_path):
    """The core's GIL-free read (what the ring's workers call) racing restacks:
    every read is all-old or all-new for the sectors a snapshot's next write
    changes.  Many restacks of one stack, each followed by a write."""
    d = str(tmp_path)
    cfg = make_device_files(d)
    img = assemble.open_image(cfg)
    errors, stop = [], threading.Event()
    states = [b"L" * 8192]

    def reader():
        try:
            while not stop.is_set():
                n = len(states)
                got = img.read(0, 8192)
                # states[-1] is appended before it is written: the read may see states[n - 2]
                assert got in states[max(0, n - 2):], "a read matched no state"
        except BaseException as e:      # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for k in range(1, 13):
            take_snapshot(img, cfg, next_config(cfg, d, f"up{k}"))
            data = bytes([k]) * 8192
            states.append(data)
            img.write(data, 0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        img.close()
    assert not errors, errors
