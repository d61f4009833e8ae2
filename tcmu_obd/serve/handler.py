"""The overlaybd TCMU handler: what happens when the kernel adds or removes a
`user` backstore whose dev_config starts with `overlaybd/` (docs/runtime.md, TCMU side).

added(dev): parse the cfgstring `overlaybd/<config path>[;<dev_id>]`, open
the image (assemble.open_image writes the resultFile), set the geometry (512-byte
blocks, num_lbas = vsize / 512, write-protected without an upper) and start
the device's ring (tcmu_obd.serve._tcmu).  removed(dev): stop the ring, flush and
close the image.  snapshot(dev_id, config): the live snapshot of the device
with that dev_id (tcmu_obd.image.snapshot), for serve.snapshot_api.  The per-command work is in _tcmu (its opcode table, the
CDB checks, READ/WRITE) and in Backend below (the other commands, by name,
through tcmu_obd.serve.scsi).
"""
import errno
import logging
import threading
import time

from tcmu_obd.image import assemble
from tcmu_obd.image.snapshot import take_snapshot
from tcmu_obd.serve import scsi
from tcmu_obd.serve.snapshot_api import NoSuchDevice
from tcmu_obd.errors import UsageError

log = logging.getLogger("tcmu_obd.serve.handler")

SUBTYPE = "overlaybd"
HANDLER_NAME = "Handler for overlaybd devices"
CFG_DESC = "overlaybd bs"
WRITE_SAME_CHUNK = 1 << 20


def parse_cfgstring(cfgstring):
    """`overlaybd/<config path>[;<dev_id>]` -> (config path, dev_id or '').
    An absolute path gives `overlaybd//abs/path.json`."""
    subtype, sep, rest = cfgstring.partition("/")
    if subtype != SUBTYPE or not sep:
        raise ValueError(f"cfgstring {cfgstring!r} does not start with '{SUBTYPE}/'")
    path, _, dev_id = rest.partition(";")
    if not path:
        raise ValueError(f"cfgstring {cfgstring!r} names no config file")
    return path, dev_id


class Backend:
    """What a device's ring calls: stack.read_into and write() for READ/WRITE
    (from _tcmu), emulate() for the SCSI commands that need no I/O, slow()
    for SYNCHRONIZE CACHE, UNMAP and WRITE SAME.  Commands come by their name
    in _tcmu's opcode table, with the LBA and block count it decoded."""

    def __init__(self, image, info):
        self.image = image
        self.info = info
        self.stack = image.stack
        self.writable = image.writable

    def write(self, buf, offset):
        n = self.image.write(buf, offset)
        if not self.info.write_cache:
            # WCE=0: the initiator will not flush, so this write must be
            # durable before the ring acknowledges it
            self.image.fsync()
        return n

    def emulate(self, name, cdb, data_out):
        return scsi.emulate(name, cdb, self.info, data_out)

    def slow(self, name, cdb, data, lba, n):
        info = self.info
        if name == "synchronize_cache":
            self.image.fsync()
            return scsi.OK
        if name == "unmap":
            st, ranges = scsi.parse_unmap(data, info)
            if st != scsi.OK:
                return st
            for lba, n in ranges:
                self.image.discard(lba * info.block_size, n * info.block_size)
            return scsi.OK
        if name == "write_same":
            unmap = bool(cdb[1] & 0x08)
            if n == 0 or n > scsi.MAX_UNMAP_BLOCKS:      # WSNZ: 0 blocks is not supported
                return scsi.INVALID_CDB
            if scsi.check_range(info, lba, n) != scsi.OK:
                return scsi.RANGE
            bs = info.block_size
            block = bytes(data[:bs])
            if len(block) < bs:
                return scsi.INVALID_PARAM_LIST_LEN
            if unmap or block.count(0) == bs:           # LBPRZ: unmapped blocks read as zeros
                self.image.discard(lba * bs, n * bs)
                return scsi.OK
            per = WRITE_SAME_CHUNK // bs
            chunk = block * min(n, per)
            pos = 0
            while pos < n:
                k = min(per, n - pos)
                self.image.write(chunk[:k * bs], (lba + pos) * bs)
                pos += k
            return scsi.OK
        raise UsageError(f"no slow path for the SCSI command {name!r} (opcode 0x{cdb[0]:02x})")


class OverlaybdHandler:
    """added()/removed() for libtcmu (called on the daemon's netlink thread)."""

    def __init__(self, service_cfg, audit=None, open_image=None, write_cache=False, inline_max=0):
        self.service_cfg = service_cfg
        self.inline_max = inline_max
        self.audit = audit or (lambda *a, **k: None)
        self.open_image = open_image or assemble.open_image
        self.write_cache = write_cache
        self.lock = threading.Lock()
        self.dev_ids = {}           # dev_id -> uio name
        self.images = {}            # dev_id -> (image, config path) of a device being served
        self.snap_lock = threading.Lock()    # a snapshot and the device's close never overlap

    def added(self, dev):
        t0 = time.monotonic()
        try:
            path, dev_id = parse_cfgstring(dev.cfgstring)
        except ValueError as e:
            log.error("%s: %s", dev.uio_name, e)
            return -errno.EINVAL
        with self.lock:
            if dev_id and dev_id in self.dev_ids:
                _result_file(path, f"failed:duplicated dev id: {dev_id}")
                log.error("%s: duplicated dev id %s (in use by %s)", dev.uio_name, dev_id,
                          self.dev_ids[dev_id])
                self.audit("open", dev=dev.uio_name, config=path, dev_id=dev_id,
                           result="duplicated dev id")
                return -errno.EPERM
            if dev_id:
                self.dev_ids[dev_id] = dev.uio_name
        try:
            image = self.open_image(path, self.service_cfg)
        except Exception as e:          # noqa: BLE001 - any failure refuses the device
            if self.open_image is not assemble.open_image:
                _result_file(path, f"failed:{e}")   # assemble.open_image wrote it, whatever failed
            self._forget(dev_id)
            log.error("%s: cannot open %s: %s", dev.uio_name, path, e)
            self.audit("open", dev=dev.uio_name, config=path, dev_id=dev_id, result=f"failed: {e}")
            return -errno.EPERM
        try:
            vsize = image.virtual_size
            if vsize <= 0 or vsize % 512:
                raise ValueError(f"virtual size {vsize} is not a positive multiple of 512")
            info = scsi.DeviceInfo(vsize // 512, 512, image.writable, dev.wwn,
                                   write_cache=self.write_cache)
            dev.set_geometry(info.num_lbas, 512, info.max_xfer_blocks, image.writable,
                             self.write_cache)
            dev.user = {"config": path, "dev_id": dev_id, "opened": time.time()}
            dev.start(Backend(image, info), self.inline_max)
            if dev_id:
                with self.lock:
                    self.images[dev_id] = (image, path)
        except Exception as e:          # noqa: BLE001
            image.close()
            self._forget(dev_id)
            _result_file(path, f"failed:{e}")
            log.error("%s: cannot serve %s: %s", dev.uio_name, path, e)
            self.audit("open", dev=dev.uio_name, config=path, dev_id=dev_id, result=f"failed: {e}")
            return -errno.EPERM
        ms = (time.monotonic() - t0) * 1000
        log.info("%s: serving %s (%d bytes, %s%s) in %.1f ms", dev.uio_name, path, vsize,
                 "read-write" if image.writable else "read-only",
                 f", dev id {dev_id}" if dev_id else "", ms)
        self.audit("open", dev=dev.uio_name, config=path, dev_id=dev_id, size=vsize,
                   writable=image.writable, result="success", ms=f"{ms:.1f}")
        return 0

    def removed(self, dev):
        backend, user = dev.backend, dev.user or {}
        self._forget(user.get("dev_id"))
        if backend is None:
            return
        err = None
        with self.snap_lock:
            try:
                backend.image.fsync()
            except Exception as e:          # noqa: BLE001
                err = e
                log.error("%s: flush failed: %s", dev.uio_name, e)
            finally:
                backend.image.close()
        st = dev.stats()
        log.info("%s: closed %s: %s", dev.uio_name, user.get("config"),
                 " ".join(f"{k}={v}" for k, v in st.items()))
        self.audit("close", dev=dev.uio_name, config=user.get("config"),
                   dev_id=user.get("dev_id", ""), result="success" if err is None else f"flush failed: {err}",
                   **st)

    def snapshot(self, dev_id, new_config):
        """The live snapshot of the device whose cfgstring ends in `;<dev_id>`
        onto the upper of `new_config`, which is then renamed over the
        device's config.  NoSuchDevice when no device has that id."""
        with self.snap_lock:
            with self.lock:
                found = self.images.get(dev_id)
            if found is None:
                raise NoSuchDevice(f"no device with dev_id {dev_id!r} (devices: "
                                   f"{', '.join(sorted(self.images)) or 'none with a dev_id'})")
            image, path = found
            take_snapshot(image, path, new_config)
        self.audit("snapshot", dev_id=dev_id, config=path, new_config=new_config, result="success")

    def _forget(self, dev_id):
        if dev_id:
            with self.lock:
                self.dev_ids.pop(dev_id, None)
                self.images.pop(dev_id, None)


def _result_file(path, text):
    """Write the config's resultFile (when the config names one)."""
    assemble.write_result_of(path, text)
