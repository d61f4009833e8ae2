"""Image conversion: an OCI/Docker image in a registry -> an overlaybd native
image in a registry (spec/image.md §2, §3, §5).  Running a converted image
is tcmu_obd/run.py.

Per source layer, as the userspace convertor's native engine does (§5):
a chain ID over the diff_ids; a look-up in the layer database (sqlite,
keyed by registry host + repository + chain ID + conversion parameters +
the converted blob below it) to reuse a blob converted before (after
checking that the registry still has it, or mounting it from another
repository of the same registry).  Reuse stops at the first layer not
found: a converted layer is an ext4 delta against the exact blob below it,
so everything above a newly converted layer is converted too (the Go
convertor keys on the chain ID alone, which can stack a reused layer on a
re-converted parent).  Otherwise: a
new RW upper (vsize for layer 0 with --mkfs, 64 GiB over the base layer,
inherit for the others), the source blob streamed from the registry straight
into overlaybd-apply's untar (tcmu_obd.apply; its digest and the diff_id are
both checked), a commit `-z -t` (ZFile inside the tar wrapper) with the
chain-ID UUIDs, and an upload.  Then the config blob (rootfs.diff_ids = the
new blob digests) and the manifest (Docker schema2 unless oci) with the
overlaybd annotations; without --mkfs the base layer comes first.  The tag is
pushed last: a failure anywhere leaves no tag (blobs already uploaded stay,
unreferenced, and the database only names blobs that were uploaded).
"""
import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin

from . import apply, baselayer, commit, imageref, registry, zfile
from .errors import ManifestError, ObdError, RemoteError, UsageError
from .rw import RWLayer

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20
OBD_VERSION = "0.1.0"
CONVERTER_ID = "tcmu-obd-convert/1"     # part of the reuse key: bump when the output changes

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
SOURCE_LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
}
FOREIGN_LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
}
SOURCE_MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
FETCH_CHUNK = 8 * MiB
UPLOAD_CHUNK = 16 * MiB


class ConvertError(ObdError):
    """The conversion failed; nothing was tagged."""


def default_db_path():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tcmu-obd", "convert.db")


def chain_ids(diff_ids):
    """identity.ChainID over diff_ids[0..i] for every i."""
    out = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def uuid_of(chain_id):
    """U = chain ID hex[0:32] as 8-4-4-4-12 (spec §5 step 6)."""
    h = chain_id.split(":", 1)[1][:32]
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                break
            h.update(b)
    return "sha256:" + h.hexdigest()


def human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0


# -- the layer database ----------------------------------------------------------------------------

class LayerDB:
    """(host, repo, chain ID, params, parent blob) -> converted blob digest
    and size.  `parent` is the digest of the converted blob the layer was
    built on (the base layer's, or "" for layer 0 with mkfs): a converted
    layer is an ext4 delta against exactly that blob, so it is reused only on
    top of it."""

    SCHEMA = """CREATE TABLE IF NOT EXISTS layers (
        host TEXT NOT NULL, repo TEXT NOT NULL, chain_id TEXT NOT NULL, params TEXT NOT NULL,
        parent TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (host, repo, chain_id, params, parent))"""

    def __init__(self, path):
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            self.conn = sqlite3.connect(path, timeout=30)
            self.conn.execute(self.SCHEMA)
            self.conn.commit()
        except sqlite3.Error as e:
            raise UsageError(f"layer database {path}: {e}") from None

    def get(self, host, repo, chain, params, parent):
        row = self.conn.execute("SELECT digest, size FROM layers WHERE host=? AND repo=? AND "
                                "chain_id=? AND params=? AND parent=?",
                                (host, repo, chain, params, parent)).fetchone()
        return (row[0], row[1]) if row else None

    def others(self, host, repo, chain, params, parent):
        """[(repo, digest, size)] of the same layer in other repositories of host."""
        return self.conn.execute("SELECT repo, digest, size FROM layers WHERE host=? AND repo!=? "
                                 "AND chain_id=? AND params=? AND parent=? ORDER BY created DESC",
                                 (host, repo, chain, params, parent)).fetchall()

    def put(self, host, repo, chain, params, parent, digest, size):
        self.conn.execute("INSERT OR REPLACE INTO layers VALUES (?,?,?,?,?,?,?,?)",
                          (host, repo, chain, params, parent, digest, size, time.time()))
        self.conn.commit()

    def delete(self, host, repo, chain, params, parent):
        self.conn.execute("DELETE FROM layers WHERE host=? AND repo=? AND chain_id=? AND params=? "
                          "AND parent=?", (host, repo, chain, params, parent))
        self.conn.commit()

    def close(self):
        self.conn.close()


# -- registry helpers ------------------------------------------------------------------------------

def blob_exists(client, repo, digest):
    resp, _ = client.send("HEAD", registry.blob_url(repo.repo_blob_url, digest), expect=(200, 404),
                          allow_redirects=True)
    return resp.status_code == 200


def mount_blob(client, repo, digest, from_repo):
    """Cross-repository blob mount; True if the registry mounted it."""
    url = f"{repo.base}/blobs/uploads/?mount={digest}&from={from_repo}"
    try:
        resp, auth = client.send("POST", url, expect=(201, 202))
    except RemoteError as e:
        log.debug("mount of %s from %s: %s", digest, from_repo, e)
        return False
    if resp.status_code == 201:
        return True
    loc = resp.headers.get("Location")      # 202: an upload session was opened instead
    if loc:
        try:
            client.send("DELETE", urljoin(resp.url, loc), authorization=auth,
                        cred_url=url, expect=(200, 202, 204, 404))
        except RemoteError:
            pass
    return False


def upload_file(client, repo, path, digest=None):
    """Upload a file as a blob unless the repository has it; returns
    (digest, uploaded?)."""
    digest = digest or sha256_file(path)
    if blob_exists(client, repo, digest):
        return digest, False
    with open(path, "rb") as f:
        got = registry.upload_blob(client, repo.base + "/blobs/uploads/",
                                   iter(lambda: f.read(UPLOAD_CHUNK), b""), UPLOAD_CHUNK)
    if got != digest:
        raise ConvertError(f"{path}: uploaded {got}, expected {digest} (changed while uploading?)")
    return digest, True


def upload_bytes(client, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not blob_exists(client, repo, digest):
        registry.upload_blob(client, repo.base + "/blobs/uploads/", [data])
    return digest


def fetch_blob_bytes(client, repo, digest, limit=64 * MiB):
    blob = client.open_blob(registry.blob_url(repo.repo_blob_url, digest))
    if blob.size > limit:
        raise ConvertError(f"{repo}: blob {digest} is {blob.size} bytes, more than {limit}")
    data = blob.read(0, blob.size) if blob.size else b""
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise ConvertError(f"{repo}: blob {digest} hashes to {got}")
    return data


def download_blob(client, repo, digest, path):
    """Download a blob to path, verifying its digest; returns its size."""
    stream = BlobStream(client, repo, digest)
    try:
        with open(path, "wb") as f:
            for chunk in stream.chunks():
                f.write(chunk)
    finally:
        stream.close()
    return os.path.getsize(path)


class BlobStream:
    """A registry blob as a sequential read()-able stream: range GETs of
    FETCH_CHUNK bytes fetched ahead by a thread, the digest checked at the
    end (a mismatch raises ConvertError from read())."""

    def __init__(self, client, repo, digest, expected_size=None, ahead=4):
        self.url = registry.blob_url(repo.repo_blob_url, digest)
        self.digest = digest
        self.blob = client.open_blob(self.url)
        self.size = self.blob.size
        if expected_size is not None and expected_size != self.size:
            raise ConvertError(f"{self.url}: the manifest says {expected_size} bytes, the registry "
                               f"has {self.size}")
        self.sha = hashlib.sha256()
        self.q = queue.Queue(ahead)
        self.stop = threading.Event()
        self.buf = b""
        self.done = False
        self.thread = threading.Thread(target=self._fetch, name="blob-fetch", daemon=True)
        self.thread.start()
        self.seconds = 0.0

    def _fetch(self):
        t0 = time.monotonic()
        try:
            off = 0
            while off < self.size and not self.stop.is_set():
                data = self.blob.read(off, min(FETCH_CHUNK, self.size - off))
                if not data:
                    raise ConvertError(f"{self.url}: empty read at {off}")
                off += len(data)
                self._put(data)
            self.seconds = time.monotonic() - t0
            self._put(None)
        except BaseException as e:   # noqa: BLE001 -- handed to the reader
            self._put(e)

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _next(self):
        if self.done:
            return b""
        item = self.q.get()
        if item is None:
            self.done = True
            got = "sha256:" + self.sha.hexdigest()
            if got != self.digest:
                raise ConvertError(f"{self.url}: the blob hashes to {got}")
            return b""
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.sha.update(item)
        return item

    def chunks(self):
        while True:
            c = self._next()
            if not c:
                return
            yield c

    def read(self, n=-1):
        if n is None or n < 0:
            return b"".join([self.buf] + list(self.chunks()))
        while len(self.buf) < n:
            c = self._next()
            if not c:
                break
            self.buf = self.buf + c if self.buf else c
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def close(self):
        self.stop.set()
        self.thread.join(5)


# -- base layer --------------------------------------------------------------------------------------

def base_layer_blob(dest_dir):
    """The bundled ext4_64 in a one-entry tar (`overlaybd.commit`, mode 0444,
    USTAR, mtime 0, as Go's archive/tar writes it); returns (path, digest, size)."""
    import tarfile
    src = baselayer.path()
    size = os.path.getsize(src)
    path = os.path.join(dest_dir, "baselayer.tar")
    ti = tarfile.TarInfo("overlaybd.commit")
    ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = size, 0o444, 0, "", ""
    with open(path, "wb") as out, open(src, "rb") as f:
        out.write(ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        shutil.copyfileobj(f, out, 4 * MiB)
        out.write(bytes(-size % 512) + bytes(1024))
    return path, sha256_file(path), os.path.getsize(path)


# -- options, results ----------------------------------------------------------------------------------

@dataclass
class Options:
    mkfs: bool = False
    vsize_gb: int = 64
    vsize_bytes: int = 0                 # overrides vsize_gb when set (tests: small disks)
    algorithm: str = "lz4"
    bs_kb: int = 4
    oci: bool = False
    plain_http: bool = False
    platform: tuple = ("linux", "amd64")
    db_path: str = ""                    # "" = default path; "none" = no reuse
    workdir: str = ""
    keep: bool = False
    service_config: object = None
    cred_file: str = ""
    compress_threads: int = 1
    quiet: bool = False

    @property
    def vsize(self):
        return self.vsize_bytes or self.vsize_gb * GiB

    def params(self, base_digest):
        fs = f"mkfs:{self.vsize}" if self.mkfs else f"base:{base_digest}"
        return f"{CONVERTER_ID};{fs};{self.algorithm};{self.bs_kb}"


@dataclass
class LayerResult:
    index: int
    source_digest: str
    source_size: int
    digest: str = ""
    size: int = 0
    reused: str = ""                     # "", "db", "mount"
    tar_bytes: int = 0
    entries: int = 0
    apply_s: float = 0.0
    commit_s: float = 0.0
    upload_s: float = 0.0


@dataclass
class Summary:
    src: str = ""
    dst: str = ""
    manifest_digest: str = ""
    manifest: bytes = b""
    config_digest: str = ""
    layers: list = field(default_factory=list)
    base: tuple = None                   # (digest, size) when prepended
    seconds: float = 0.0


# -- the conversion ------------------------------------------------------------------------------------

class Converter:
    def __init__(self, opts, out=None):
        self.o = opts
        self.out = out if out is not None else sys.stderr
        algo = opts.algorithm
        if algo not in zfile.ALGOS:
            raise UsageError(f"--algorithm {algo!r}: must be lz4 or zstd")
        if opts.bs_kb not in (4, 8, 16, 32, 64):
            raise UsageError(f"--bs {opts.bs_kb}: must be 4, 8, 16, 32 or 64 (KiB)")
        if opts.vsize <= 0 or opts.vsize % 4096:
            raise UsageError(f"--vsize: {opts.vsize} bytes is not a positive multiple of 4 KiB")

    def say(self, text):
        if not self.o.quiet:
            print(f"convert: {text}", file=self.out, flush=True)

    def run(self, src_text, dst_text):
        from . import service_config
        t0 = time.monotonic()
        src = imageref.parse_ref(src_text, self.o.plain_http)
        dst = imageref.parse_ref(dst_text, self.o.plain_http)
        if dst.ref.startswith("sha256:"):
            raise UsageError(f"{dst_text}: the destination needs a tag, not a digest")
        if not self.o.mkfs and self.o.vsize != 64 * GiB:
            self.say("warning: --vsize is used with --mkfs only; the base layer is 64 GiB")
        svc = self.o.service_config or service_config.load(None)
        db = None
        if self.o.db_path != "none":
            db = LayerDB(self.o.db_path or default_db_path())
        work = tempfile.mkdtemp(prefix="obd-convert-", dir=self.o.workdir or None)
        client = imageref.client_from_service_config(svc, self.o.cred_file)
        try:
            summary = self._convert(client, db, src, dst, work)
            summary.seconds = time.monotonic() - t0
            self._report(summary)
            return summary
        finally:
            client.close()
            if db is not None:
                db.close()
            if self.o.keep:
                self.say(f"work directory kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)

    # -- steps ---------------------------------------------------------------------------------------
    def _source(self, client, src):
        manifest, where = imageref.fetch_image_manifest(client, src, list(self.o.platform))
        layers = manifest.get("layers")
        cfg_desc = manifest.get("config") or {}
        if not isinstance(layers, list) or not layers:
            raise ManifestError(f"{where}: no layers")
        for i, layer in enumerate(layers):
            ann = layer.get("annotations") or {}
            if any(k.startswith(imageref.A_PREFIX) for k in ann):
                raise ConvertError(f"{where}: layers[{i}] carries overlaybd annotations: the source "
                                   f"is already an overlaybd image")
            mt = layer.get("mediaType", "")
            if mt in FOREIGN_LAYER_TYPES or layer.get("urls"):
                raise ConvertError(f"{where}: layers[{i}] is a foreign (non-distributable) layer "
                                   f"({mt}); it is not converted")
            if mt not in SOURCE_LAYER_TYPES:
                raise ConvertError(f"{where}: layers[{i}] has media type {mt!r}, not an image "
                                   f"layer tar")
            if not imageref._DIGEST.match(layer.get("digest", "")):
                raise ManifestError(f"{where}: layers[{i}].digest {layer.get('digest')!r}")
        cdig = cfg_desc.get("digest", "")
        if not imageref._DIGEST.match(cdig):
            raise ManifestError(f"{where}: config.digest {cdig!r}")
        raw = fetch_blob_bytes(client, src, cdig)
        try:
            config = json.loads(raw)
            diff_ids = config["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{where}: config {cdig}: no rootfs.diff_ids ({e})") from None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise ManifestError(f"{where}: config has {len(diff_ids) if isinstance(diff_ids, list) else '?'} "
                                f"diff_ids for {len(layers)} layers")
        for d in diff_ids:
            if not isinstance(d, str) or not imageref._DIGEST.match(d):
                raise ManifestError(f"{where}: diff_id {d!r} is not sha256:<64 hex>")
        if len(layers) + (0 if self.o.mkfs else 1) > 255:
            raise ConvertError(f"{where}: {len(layers)} layers; overlaybd stacks at most 255")
        return manifest, where, config, diff_ids

    def _convert(self, client, db, src, dst, work):
        o = self.o
        manifest, where, config, diff_ids = self._source(client, src)
        self._src_repo = src
        layers = manifest["layers"]
        chains = chain_ids(diff_ids)
        n = len(layers)
        self.say(f"{where}: {n} layers, {human(sum(int(l.get('size', 0)) for l in layers))} "
                 f"-> {dst} ({'mkfs ' + human(o.vsize) if o.mkfs else 'on the base layer'}, "
                 f"{o.algorithm} {o.bs_kb} KiB)")
        base = None
        if not o.mkfs:
            bpath, bdig, bsize = base_layer_blob(work)
            base = (bpath, bdig, bsize)
        params = o.params(base[1] if base else "")
        results = [LayerResult(i, l["digest"], int(l.get("size", 0))) for i, l in enumerate(layers)]

        # 1. what can be reused: a prefix of the layers (each on the blob below it)
        parent = base[1] if base else ""
        for r in results:
            if db is None or not self._reuse(client, db, dst, chains[r.index], params, parent, r):
                break
            parent = r.digest
        todo = [r for r in results if not r.reused]

        # 2. the base layer
        if base is not None:
            t = time.monotonic()
            _, up = upload_file(client, dst, base[0], base[1])
            self.say(f"base layer {base[1][:19]}… {human(base[2])}"
                     f"{' uploaded' if up else ' already in the registry'} "
                     f"({time.monotonic() - t:.2f} s)")

        # 3. the layers, bottom to top
        lowers = [base[0]] if base else []
        prev_uuid = ""
        for r in results:
            i = r.index
            ldir = os.path.join(work, f"{i:04d}")
            os.makedirs(ldir)
            commit_path = os.path.join(ldir, "overlaybd.commit")
            tag = f"[{i + 1}/{n}] {r.source_digest[:19]}…"
            if r.reused:
                if todo:          # later layers are converted on top of it: fetch it
                    download_blob(client, dst, r.digest, commit_path)
                    lowers.append(commit_path)
                self.say(f"{tag} reused {r.digest[:19]}… {human(r.size)} "
                         f"({'layer database' if r.reused == 'db' else 'mounted from another repository'})")
                prev_uuid = uuid_of(chains[i])
                continue
            self._convert_layer(client, dst, r, layers[i], diff_ids[i], chains[i], prev_uuid,
                                ldir, lowers, commit_path, tag)
            if db is not None:
                db.put(dst.host, dst.repo, chains[i], params, parent, r.digest, r.size)
            parent = r.digest
            if r is not todo[-1]:
                lowers.append(commit_path)
            else:
                os.unlink(commit_path)
            prev_uuid = uuid_of(chains[i])

        # 4. config and manifest
        new_config = dict(config)
        rootfs = dict(config.get("rootfs") or {})
        new_diff_ids = ([base[1]] if base else []) + [r.digest for r in results]
        rootfs["diff_ids"] = new_diff_ids
        new_config["rootfs"] = rootfs
        config_bytes = imageref.go_json(new_config).encode()
        config_digest = upload_bytes(client, dst, config_bytes)
        layer_type = OCI_LAYER_TAR if o.oci else DOCKER_LAYER_TAR
        descs = []
        if base:
            descs.append(_layer_desc(layer_type, base[1], base[2]))
        descs += [_layer_desc(layer_type, r.digest, r.size) for r in results]
        doc = {"schemaVersion": 2,
               "mediaType": OCI_MANIFEST if o.oci else DOCKER_MANIFEST,
               "config": {"mediaType": OCI_CONFIG if o.oci else DOCKER_CONFIG,
                          "digest": config_digest, "size": len(config_bytes)},
               "layers": descs}
        mbytes = imageref.go_json(doc).encode()
        mdigest = registry.push_manifest(client, dst.base, dst.ref, mbytes, doc["mediaType"])
        return Summary(str(src), str(dst), mdigest, mbytes, config_digest, results,
                       (base[1], base[2]) if base else None)

    def _reuse(self, client, db, dst, chain, params, parent, r):
        """Find layer r converted before on `parent`: in this repository (the
        blob must still be there), else mounted from another repository of
        the same registry.  Fills r and returns True when found."""
        hit = db.get(dst.host, dst.repo, chain, params, parent)
        if hit and blob_exists(client, dst, hit[0]):
            r.digest, r.size, r.reused = hit[0], hit[1], "db"
            return True
        if hit:
            db.delete(dst.host, dst.repo, chain, params, parent)       # stale
        for repo, digest, size in db.others(dst.host, dst.repo, chain, params, parent):
            if mount_blob(client, dst, digest, repo):
                r.digest, r.size, r.reused = digest, size, "mount"
                db.put(dst.host, dst.repo, chain, params, parent, digest, size)
                return True
        return False

    def _convert_layer(self, client, dst, r, desc, diff_id, chain, prev_uuid, ldir, lowers,
                       commit_path, tag):
        o = self.o
        i = r.index
        data, index = os.path.join(ldir, "writable_data"), os.path.join(ldir, "writable_index")
        if i == 0:
            vsize = o.vsize if o.mkfs else 64 * GiB
        else:
            vsize = 0           # inherit from the lowers
        RWLayer.create(data, index, vsize).close()
        cfg_path = os.path.join(ldir, "config.json")
        with open(cfg_path, "w") as f:
            json.dump({"lowers": [{"file": p} for p in lowers],
                       "upper": {"index": index, "data": data}, "resultFile": ""}, f)
        t = time.monotonic()
        stream = BlobStream(client, self._src_repo, r.source_digest, r.source_size or None)
        try:
            res = apply.apply_layer("<" + r.source_digest + ">", cfg_path,
                                    mkfs_first=o.mkfs and i == 0, checksum=diff_id,
                                    fileobj=stream, workdir=ldir)
        except apply.ApplyError as e:
            raise ConvertError(f"layer {i} ({r.source_digest}): {e}") from None
        finally:
            stream.close()
        r.apply_s = time.monotonic() - t
        r.tar_bytes, r.entries = res.tar_bytes, res.entries
        t = time.monotonic()
        self._commit(data, index, commit_path, uuid_of(chain), prev_uuid)
        os.unlink(data)
        os.unlink(index)
        r.commit_s = time.monotonic() - t
        t = time.monotonic()
        r.digest = sha256_file(commit_path)
        r.size = os.path.getsize(commit_path)
        _, uploaded = upload_file(client, dst, commit_path, r.digest)
        r.upload_s = time.monotonic() - t
        self.say(f"{tag} {human(r.source_size)} {res.compression} -> {human(r.tar_bytes)} tar, "
                 f"{r.entries} entries: apply {r.apply_s:.2f} s, commit {r.commit_s:.2f} s -> "
                 f"{r.digest[:19]}… {human(r.size)}, "
                 f"{'upload' if uploaded else 'already in the registry'} {r.upload_s:.2f} s")

    def _commit(self, data, index, out_path, uid, parent):
        from .cli.common import Output
        layer = RWLayer.open(data, index)
        try:
            files = [layer.backing]
            header = commit.layer_info(files, uid, parent)
            out = Output(out_path, use_zfile=True, use_tar=True, algo=zfile.ALGOS[self.o.algorithm],
                         bs=self.o.bs_kb * 1024, threads=self.o.compress_threads,
                         overwrite_header=True)
            try:
                commit.compact(layer.index.records(), files, out, header)
                out.close()
            finally:
                out.abort()
        finally:
            layer.close()

    def _report(self, s):
        new = [r for r in s.layers if not r.reused]
        src_bytes = sum(r.source_size for r in new)
        tar_bytes = sum(r.tar_bytes for r in new)
        out_bytes = sum(r.size for r in s.layers) + (s.base[1] if s.base else 0)
        busy = sum(r.apply_s + r.commit_s + r.upload_s for r in new)
        rate = f", {tar_bytes / busy / 1e6:.1f} MB/s of tar" if busy and tar_bytes else ""
        self.say(f"pushed {s.dst} {s.manifest_digest}")
        self.say(f"summary: {len(s.layers)} layers ({len(new)} converted, "
                 f"{len(s.layers) - len(new)} reused){' + base layer' if s.base else ''}; "
                 f"source {human(src_bytes)} ({human(tar_bytes)} tar) -> overlaybd "
                 f"{human(out_bytes)}; {s.seconds:.2f} s total (apply "
                 f"{sum(r.apply_s for r in new):.2f} s, commit {sum(r.commit_s for r in new):.2f} s, "
                 f"upload {sum(r.upload_s for r in new):.2f} s){rate}")


def _layer_desc(media_type, digest, size):
    return {"mediaType": media_type, "digest": digest, "size": size,
            "annotations": {imageref.A_BLOB_DIGEST: digest, imageref.A_BLOB_SIZE: str(size),
                            imageref.A_PREFIX + "version": OBD_VERSION}}


def convert(src, dst, opts=None, out=None):
    """Convert the image src into the overlaybd image dst; returns a Summary."""
    conv = Converter(opts or Options(), out)
    return conv.run(src, dst)
