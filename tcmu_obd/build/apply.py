"""overlaybd-apply: unpack an OCI layer tar into the ext4 file system of an
image's writable upper layer (docs/operations.md, overlaybd-apply), through the kernel's
ext4 on a block device.

The device comes from tcmu_obd.serve.blockdev: a SCSI disk through TCMU where the
kernel has it (served by the running daemon, or by one private to this
process), else the image served by FUSE in this process behind a direct-I/O
loop device; --frontend / $TCMU_OBD_FRONTEND forces one.  With --raw it is a
plain image file on a loop device.  `--mkfs` makes ext4 first with overlaybd's
options.  The ext4 is mounted on a private temporary directory, the tar is
unpacked into it with overlaybd's untar semantics (below), then everything is
unmounted, detached and the upper synced.

Untar semantics: tcmu_obd.build.untar.

Failure: any error (a corrupt tar, a wrong checksum, a file system that
fills up: ENOSPC is reported as "the layer does not fit") raises ApplyError
after the teardown; an append-only upper is then truncated back to its
state before the apply (it only ever grows), so it is left unchanged.  A
sparse upper cannot be rolled back: its checksum is checked before anything
is written (a non-seekable input is spooled to a temporary file for that),
and other failures leave it modified (the message says so).
"""
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from tcmu_obd.serve import blockdev
from tcmu_obd.serve.blockdev import raw_loop
from tcmu_obd.build.untar import COPY_CHUNK, TarInput, check_checksum, decode_errors, untar
from tcmu_obd.errors import ApplyError, LayerTooBig, ObdError

log = logging.getLogger(__name__)


# overlaybd's convertor makes ext4 as (mkfs -t ext4 -O ^has_journal,sparse_super,flex_bg -G 1 -E discard -F)
# with the geometry overlaybd-create --mkfs uses: 4 KiB blocks, 256-byte inodes,
# one inode per 16 KiB, 5 % reserved.  The discard leaves the whole device reading as zeros (an
# LSMT upper answers discards with zeroed records, a loop-mounted raw file punches holes), so
# assume_storage_prezeroed is true: the inode tables are not written and are marked zeroed, and
# the kernel's lazy init never zeroes them later (a 64 GiB ext4 costs ~5 MB, not ~1 GiB).
# ^metadata_csum: Debian's mke2fs turns it on by default; overlaybd's libext2fs mkfs does not
# (overlaybd-create --mkfs lists its features), and its userspace ext4 must be able to write our layers.
MKFS_CMD = ["mkfs.ext4", "-F", "-q", "-b", "4096", "-I", "256", "-i", "16384", "-m", "5",
            "-O", "^has_journal,sparse_super,flex_bg,^metadata_csum", "-G", "1",
            "-E", "discard,assume_storage_prezeroed=1"]
MOUNT_OPTS = "noinit_itable,nosuid,nodev"


@dataclass
class ApplyResult:
    entries: int = 0            # tar members processed (whiteouts included)
    tar_bytes: int = 0          # bytes of the uncompressed tar stream
    input_bytes: int = 0        # bytes read from the input (compressed, if it was)
    compression: str = "none"   # none | gzip | zstd
    digest: str = ""            # sha256 of the uncompressed tar
    seconds: float = 0.0
    fs_bytes: int = 0           # ext4 size
    frontend: str = ""          # the block device used: "tcmu (/dev/sdX, served by ...)" or "fuse ..."


# -- block device and mount ------------------------------------------------------------------------

def run_checked(cmd, what):
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if p.returncode:
        raise ApplyError(f"{what}: {' '.join(cmd)}: exit {p.returncode}: "
                         f"{(p.stderr or p.stdout).strip()[-500:]}")
    return p.stdout


def mkfs(dev):
    run_checked(MKFS_CMD + [dev], "mkfs")


def mount_ext4(dev, where, read_only=False):
    opts = MOUNT_OPTS + (",ro" if read_only else "")
    run_checked(["mount", "-t", "ext4", "-o", opts, dev, where], f"mounting {dev}")


def umount(where):
    run_checked(["umount", where], f"unmounting {where}")


def fs_size(path):
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


@contextlib.contextmanager
def mounted(dev, mnt, read_only=False):
    """ext4 on dev mounted at mnt (made if missing) for the duration."""
    os.makedirs(mnt, exist_ok=True)
    mount_ext4(dev, mnt, read_only)
    try:
        yield mnt
    finally:
        umount(mnt)


def mkfs_layer(data_path, index_path, workdir=None, frontend=None, open_upper=None):
    """overlaybd-create --mkfs: make ext4 (MKFS_CMD) on a new RW layer with
    no lowers, on a block device from tcmu_obd.serve.blockdev (TCMU or FUSE + loop).
    `open_upper(data_path, index_path)` opens the layer (default RWLayer.open;
    a warp layer passes WarpRWLayer.open)."""
    import json
    from tcmu_obd.image.stack import Image
    from tcmu_obd.image.rw import RWLayer
    open_upper = open_upper or RWLayer.open
    tmp = tempfile.mkdtemp(prefix="obd-mkfs-", dir=workdir)
    try:
        cfg_path = os.path.join(tmp, "config.v1.json")
        with open(cfg_path, "w") as f:
            json.dump({"lowers": [], "upper": {"data": os.path.abspath(data_path),
                                               "index": os.path.abspath(index_path)},
                       "resultFile": os.path.join(tmp, "result")}, f)

        def opener():
            return Image([], open_upper(data_path, index_path))
        with blockdev.image_device(cfg_path, opener, tmp, frontend=frontend) as d:
            mkfs(d.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the apply ---------------------------------------------------------------------------------------

def _upper_state(cfg):
    """(data path, data size, index path, index size, sparse) of an
    append-only upper, for the rollback; None for a sparse one."""
    from tcmu_obd.format.lsmt import HT_SPACE, LsmtHeader
    data, index = cfg.upper.get("data"), cfg.upper.get("index")
    if not data or not index:
        raise ApplyError(f"{cfg.path}: the config has no upper layer (upper.data and upper.index)")
    with open(data, "rb") as f:
        hdr = LsmtHeader.unpack(f.read(HT_SPACE), data, "header")
    if hdr.is_sparse:
        return None
    return (data, os.path.getsize(data), index, os.path.getsize(index))


def _rollback(state):
    data, dsize, index, isize = state
    for path, size in ((index, isize), (data, dsize)):
        with open(path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())


def _precheck(path, checksum, fileobj):
    """For an upper that cannot be rolled back: check the checksum first.
    Returns (input path to apply, temp file to remove or None)."""
    spool = None
    try:
        if fileobj is not None or path == "-" or not os.path.isfile(path):
            fd, spool = tempfile.mkstemp(prefix="obd-apply-")
            with os.fdopen(fd, "wb") as out:
                if fileobj is not None:
                    shutil.copyfileobj(fileobj, out, COPY_CHUNK)
                elif path == "-":
                    shutil.copyfileobj(sys.stdin.buffer, out, COPY_CHUNK)
                else:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, out, COPY_CHUNK)
        inp = TarInput(spool or path)
        try:
            inp.tar.drain()
        except decode_errors() as e:
            raise ApplyError(f"{path}: corrupt {inp.compression} stream: {e}") from None
        finally:
            inp.close()
        if inp.digest() != checksum:
            raise ApplyError(f"checksum mismatch: the uncompressed tar is {inp.digest()}, "
                             f"expected {checksum}; nothing was applied")
    except BaseException:
        if spool:
            os.unlink(spool)
        raise
    return (spool or path), spool


def apply_layer(input_path, image_config, mkfs_first=False, checksum="", raw=False,
                service_cfg=None, fileobj=None, workdir=None, progress=None, frontend=None):
    """Apply the layer tar at input_path (or read from fileobj) onto the
    upper of image_config (a config.v1.json path or ImageConfig), or onto a
    raw image file with raw=True.  Returns an ApplyResult; raises ApplyError."""
    from tcmu_obd.image import config
    checksum = check_checksum(checksum)
    if fileobj is None and input_path != "-":
        input_path = os.path.abspath(input_path)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="obd-apply-", dir=workdir)
    spool = None
    rollback = None
    try:
        if raw:
            cfg = None
            if not os.path.isfile(image_config):
                raise ApplyError(f"{image_config}: no such raw image file")
        else:
            cfg = image_config if isinstance(image_config, config.ImageConfig) else config.load(image_config)
            rollback = _upper_state(cfg)
            if rollback is None and checksum:
                input_path, spool = _precheck(input_path, checksum, fileobj)
                fileobj = None
        try:
            result = _apply(input_path, cfg, image_config, mkfs_first, checksum, raw, service_cfg,
                            fileobj, tmp, progress, frontend)
        except BaseException as e:
            if rollback is not None:
                _rollback(rollback)
                log.info("the upper layer is back to its state before the apply")
            elif not raw and isinstance(e, ObdError):
                raise ApplyError(f"{e} (the sparse upper layer may be partly written)") from None
            raise
        result.seconds = time.monotonic() - t0
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if spool:
            os.unlink(spool)


def _apply(input_path, cfg, image_config, mkfs_first, checksum, raw, service_cfg, fileobj, tmp,
           progress, frontend):
    from tcmu_obd.image import assemble
    result = ApplyResult()
    with contextlib.ExitStack() as stack:
        if raw:
            dev = stack.enter_context(raw_loop(image_config))
        else:
            d = stack.enter_context(blockdev.image_device(
                cfg.path, lambda: assemble.open_image(cfg, service_cfg), tmp,
                frontend=frontend, service_cfg=service_cfg))
            dev = d.path
            result.frontend = f"{d.frontend} ({d.path}, served by {d.served_by})"
            log.info("applying through %s", result.frontend)
        if mkfs_first:
            mkfs(dev)
        try:
            mnt = stack.enter_context(mounted(dev, os.path.join(tmp, "mnt")))
        except ApplyError as e:
            raise ApplyError(f"{e} (is there an ext4 file system on the image? --mkfs makes one)") \
                from None
        result.fs_bytes = fs_size(mnt)
        inp = TarInput(input_path, fileobj)
        stack.callback(inp.close)
        result.compression = inp.compression
        try:
            u = untar(inp.stream, mnt, progress)
            inp.tar.drain()
        except decode_errors() as e:
            raise ApplyError(f"{input_path}: corrupt {inp.compression} stream: {e}") from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LayerTooBig(
                    f"the layer does not fit: no space left on the image's ext4 "
                    f"({result.fs_bytes} bytes) after {inp.tar.count} bytes of the tar"
                    f"{': ' + e.filename[len(mnt):] if e.filename and e.filename.startswith(mnt) else ''}"
                ) from None
            where = e.filename[len(mnt):] if isinstance(e.filename, str) and e.filename.startswith(mnt) else e.filename
            raise ApplyError(f"applying the layer: {where + ': ' if where else ''}{e.strerror or e}") from None
        result.entries = u.entries
        result.tar_bytes = inp.tar.count
        result.input_bytes = inp.input.count
        result.digest = inp.digest()
        if checksum and result.digest != checksum:
            raise ApplyError(f"checksum mismatch: the uncompressed tar is {result.digest}, expected "
                             f"{checksum}")
    return result
