"""`tcmu-obd run`: an overlaybd image from a registry, opened lazily and
mounted read-only.  The manifest gives the lowers; a config.v1.json with
remote lowers (the base layer first) is written to a work directory; the
image is served as a block device (tcmu_obd/serve/blockdev.py: TCMU where the
kernel has it, else FUSE + loop) and its ext4 mounted.  Counts the bytes
received from the registry.  Not the conversion (convert.py) nor the
device plumbing itself.
"""
import contextlib
import logging
import os
import shutil
import tempfile
import threading

from tcmu_obd.build import apply
from tcmu_obd.serve import blockdev
from tcmu_obd.remote import imageref

log = logging.getLogger(__name__)


class _CountingBlob:
    """A RemoteBlob whose reads are counted (bytes received from the registry)."""

    def __init__(self, blob, counter):
        self.blob, self.counter = blob, counter
        self.url = blob.url

    @property
    def size(self):
        return self.blob.size

    def read(self, offset, length):
        data = self.blob.read(offset, length)
        self.counter.add(len(data))
        return data


class _CountingClient:
    """Forwards to a RegistryClient; blobs it opens count their reads."""

    def __init__(self, client):
        self._client = client
        self._lock = threading.Lock()
        self.fetched = 0
        self.reads = 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def add(self, n):
        with self._lock:
            self.fetched += n
            self.reads += 1

    def open_blob(self, url):
        return _CountingBlob(self._client.open_blob(url), self)


class RunningImage:
    """An overlaybd image from a registry, mounted read-only: manifest ->
    config.v1.json (remote lowers) -> block device (TCMU or FUSE + loop) ->
    ext4 (ro).  Use as a context manager; .mountpoint, .dev, .device (a
    blockdev.Device), .virtual_size, .fetched(), .image_size (the blobs)."""

    def __init__(self, ref_text, mountpoint=None, plain_http=False, platform=("linux", "amd64"),
                 service_cfg=None, cred_file="", cache_dir="", frontend=None):
        self.ref_text = ref_text
        self.mountpoint = mountpoint
        self.plain_http = plain_http
        self.platform = list(platform)
        self.svc = service_cfg
        self.cred_file = cred_file
        self.cache_dir = cache_dir
        self.frontend = frontend
        self.device = None
        self.virtual_size = 0
        self.work = None
        self._stack = None

    def __enter__(self):
        import contextlib
        from dataclasses import replace
        from tcmu_obd.image import assemble
        from tcmu_obd import service_config
        from tcmu_obd.remote.context import RemoteContext
        self._stack = contextlib.ExitStack()
        try:
            self.work = tempfile.mkdtemp(prefix="obd-run-")
            self._stack.callback(shutil.rmtree, self.work, True)
            ref = imageref.parse_ref(self.ref_text, self.plain_http)
            svc = self.svc or service_config.load(None)
            from tcmu_obd.image import turbometa
            with imageref.client_from_service_config(svc, self.cred_file) as client:
                manifest, where = imageref.fetch_image_manifest(client, ref, self.platform)
                self.lowers = imageref.overlaybd_lowers(manifest, where, turbo_ok=True)
                self.lowers = turbometa.resolve(client, ref, self.lowers,
                                                os.path.join(self.work, "layers"))
            self.where = where
            self.image_size = sum(low.get("size", 0) for low in self.lowers)
            self.config_path = os.path.join(self.work, "config.v1.json")
            doc = {"repoBlobUrl": ref.repo_blob_url, "lowers": self.lowers, "upper": {},
                   "resultFile": os.path.join(self.work, "init-debug.log")}
            imageref.write_atomic(self.config_path, imageref.go_json(doc).encode())
            cache_dir = self.cache_dir or os.path.join(self.work, "cache")
            svc = replace(svc, cache_config=replace(svc.effective_cache, cache_dir=cache_dir))
            remote = RemoteContext(svc)
            self._stack.callback(remote.close)
            self.counter = remote.client = _CountingClient(remote.client)

            def opener():
                return assemble.open_image(self.config_path, svc, remote=remote)
            self.device = self._stack.enter_context(blockdev.image_device(
                self.config_path, opener, self.work, read_only=True, frontend=self.frontend,
                service_cfg=svc))
            self.dev = self.device.path
            self.virtual_size = blockdev.size_of(self.dev)
            if not self.mountpoint:
                self.mountpoint = os.path.join(self.work, "rootfs")
            if any(os.path.basename(low.get("file", "")) == "erofs.fs.meta" for low in self.lowers):
                self._stack.enter_context(_erofs_mounted(self.dev, self.mountpoint))
            else:
                self._stack.enter_context(apply.mounted(self.dev, self.mountpoint, read_only=True))
            return self
        except BaseException:
            self._stack.close()
            raise

    def fetched(self):
        """Bytes received from the registry, or None when a running daemon
        serves the image (its reads are not seen from here)."""
        return self.counter.fetched if self.device.in_process else None

    def __exit__(self, *exc):
        self._stack.close()


@contextlib.contextmanager
def _erofs_mounted(dev, mnt):
    """A TurboOCI image whose meta layers are erofs: mounted read-only as erofs."""
    os.makedirs(mnt, exist_ok=True)
    apply.run_checked(["mount", "-t", "erofs", "-o", "ro", dev, mnt], f"mounting {dev} (erofs)")
    try:
        yield mnt
    finally:
        apply.umount(mnt)
