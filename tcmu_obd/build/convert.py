"""Image conversion: an OCI/Docker image in a registry -> an overlaybd native
image in a registry (docs/formats.md, Images in a registry).  Running a converted image
is tcmu_obd/build/run.py.

Per source layer, as the userspace convertor's native engine does (docs/formats.md, Converting an OCI image):
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
into overlaybd-apply's untar (tcmu_obd.build.apply; its digest and the diff_id are
both checked), a commit `-z -t` (ZFile inside the tar wrapper) with the
chain-ID UUIDs, and an upload.  Then the config blob (rootfs.diff_ids = the
new blob digests) and the manifest (Docker schema2 unless oci) with the
overlaybd annotations; without --mkfs the base layer comes first.  The tag is
pushed last: a failure anywhere leaves no tag (blobs already uploaded stay,
unreferenced, and the database only names blobs that were uploaded).
Progress (tcmu_obd.build.progress): a bar or a final line per layer for download,
apply, compress and upload; a table of sizes and seconds at the end.
"""
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field

from tcmu_obd.build import apply
from tcmu_obd.image import baselayer, commit
from tcmu_obd.remote import distribution, imageref
from tcmu_obd.format import zfile
from tcmu_obd.remote.blobs import (BlobStream, blob_exists, download_blob, fetch_blob_bytes, mount_blob,
                                   sha256_file, upload_bytes, upload_file)
from tcmu_obd.format.lsmt import HT_SPACE, SECTOR
from tcmu_obd.build.progress import Progress, human, null_bar, table
from tcmu_obd.errors import ManifestError, ObdError, UsageError
from tcmu_obd.image.output import Output
from tcmu_obd.image.rw import RWLayer

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
    """U = chain ID hex[0:32] as 8-4-4-4-12 (docs/formats.md, Layer UUIDs from chain IDs)."""
    h = chain_id.split(":", 1)[1][:32]
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


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
    progress: str = "auto"               # progress.MODES: bars on a terminal, else lines
    turbo: bool = False                  # --turboOCI: tcmu_obd.build.convert_turbo
    fstype: str = "ext4"                 # --turboOCI --fstype

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
    download_s: float = 0.0              # receiving the source blob (while it is applied)
    apply_s: float = 0.0
    commit_s: float = 0.0                # commit -z -t and the blob's digest
    upload_s: float = 0.0
    uploaded: bool = False               # False: the registry had the blob already


@dataclass
class Summary:
    src: str = ""
    dst: str = ""
    manifest_digest: str = ""
    manifest: bytes = b""
    config_digest: str = ""
    layers: list = field(default_factory=list)
    base: tuple = None                   # (digest, size) when prepended
    base_uploaded: bool = False
    base_upload_s: float = 0.0
    seconds: float = 0.0


# -- the conversion ------------------------------------------------------------------------------------

class Converter:
    def __init__(self, opts, out=None):
        self.o = opts
        self.out = out if out is not None else sys.stderr
        self.progress = Progress(self.out, opts.progress, quiet=opts.quiet, prefix="convert: ")
        algo = opts.algorithm
        if algo not in zfile.ALGOS:
            raise UsageError(f"--algorithm {algo!r}: must be lz4 or zstd")
        if opts.bs_kb not in (4, 8, 16, 32, 64):
            raise UsageError(f"--bs {opts.bs_kb}: must be 4, 8, 16, 32 or 64 (KiB)")
        if opts.vsize <= 0 or opts.vsize % 4096:
            raise UsageError(f"--vsize: {opts.vsize} bytes is not a positive multiple of 4 KiB")

    def say(self, text):
        self.progress.message(text)

    def run(self, src_text, dst_text):
        from tcmu_obd import service_config
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
            with self.progress.logging_above():
                summary = self._convert(client, db, src, dst, work)
            summary.seconds = time.monotonic() - t0
            self._report(summary)
            return summary
        finally:
            self.progress.close()
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
            if not imageref.DIGEST_RE.match(layer.get("digest", "")):
                raise ManifestError(f"{where}: layers[{i}].digest {layer.get('digest')!r}")
        cdig = cfg_desc.get("digest", "")
        if not imageref.DIGEST_RE.match(cdig):
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
            if not isinstance(d, str) or not imageref.DIGEST_RE.match(d):
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
        base_up = (False, 0.0)
        if base is not None:
            with self.progress.task("base layer upload", base[2]) as bar:
                _, up = upload_file(client, dst, base[0], base[1], bar)
            base_up = (up, bar.elapsed)

        # 3. the layers, bottom to top
        lowers = [base[0]] if base else []
        prev_uuid = ""
        for r in results:
            i = r.index
            ldir = os.path.join(work, f"{i:04d}")
            os.makedirs(ldir)
            commit_path = os.path.join(ldir, "overlaybd.commit")
            tag = f"[{i + 1}/{n}] {r.source_digest[:19]}…"
            label = f"layer {i + 1}/{n}"
            if r.reused:
                if todo:          # later layers are converted on top of it: fetch it
                    with self.progress.task(f"{label} download", r.size) as bar:
                        bar.set_note("reused blob, a lower of the next layers")
                        download_blob(client, dst, r.digest, commit_path, bar)
                    lowers.append(commit_path)
                self.say(f"{tag} reused {r.digest[:19]}… {human(r.size)} "
                         f"({'layer database' if r.reused == 'db' else 'mounted from another repository'})")
                prev_uuid = uuid_of(chains[i])
                continue
            self._convert_layer(client, dst, r, diff_ids[i], chains[i], prev_uuid,
                                ldir, lowers, commit_path, tag, label)
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
        mdigest = distribution.push_manifest(client, dst.base, dst.ref, mbytes, doc["mediaType"])
        return Summary(str(src), str(dst), mdigest, mbytes, config_digest, results,
                       (base[1], base[2]) if base else None, *base_up)

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

    def _convert_layer(self, client, dst, r, diff_id, chain, prev_uuid, ldir, lowers,
                       commit_path, tag, label):
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
        res = self._pull_apply(client, r, diff_id, cfg_path, ldir, label)
        r.tar_bytes, r.entries = res.tar_bytes, res.entries
        with self.progress.task(f"{label} compress") as bar:
            self._commit(data, index, commit_path, uuid_of(chain), prev_uuid, bar)
            os.unlink(data)
            os.unlink(index)
            # the digest is part of making the blob: the upload step only sends it
            r.digest = sha256_file(commit_path)
            r.size = os.path.getsize(commit_path)
            bar.close(note=f"-> {human(r.size)} {o.algorithm} blob")
        r.commit_s = bar.elapsed
        with self.progress.task(f"{label} upload", r.size) as bar:
            _, r.uploaded = upload_file(client, dst, commit_path, r.digest, bar)
        r.upload_s = bar.elapsed
        self.say(f"{tag} {human(r.source_size)} {res.compression} -> {human(r.tar_bytes)} tar, "
                 f"{r.entries} entries -> {r.digest[:19]}… {human(r.size)}"
                 f"{'' if r.uploaded else ', already in the registry'}")

    def _pull_apply(self, client, r, diff_id, cfg_path, ldir, label):
        """Stream the source blob into apply: two bars running at once, the
        download (bytes received) and the apply (compressed bytes untarred;
        its final line adds the tar size)."""
        mkfs = self.o.mkfs and r.index == 0
        with self.progress.task(f"{label} download", r.source_size) as dl, \
                self.progress.task(f"{label} apply", r.source_size) as ap:
            stream = BlobStream(client, self._src_repo, r.source_digest,
                                r.source_size or None, fetch_bar=dl, read_bar=ap)
            try:
                res = apply.apply_layer("<" + r.source_digest + ">", cfg_path, mkfs_first=mkfs,
                                        checksum=diff_id, fileobj=stream, workdir=ldir,
                                        progress=lambda n: ap.set_note(f"{n} entries"))
            except apply.ApplyError as e:
                raise ConvertError(f"layer {r.index} ({r.source_digest}): {e}") from None
            finally:
                stream.close()
            ap.close(note=f"{res.compression} -> {human(res.tar_bytes)} tar, {res.entries} entries")
        r.download_s, r.apply_s = dl.elapsed, ap.elapsed
        return res

    def _commit(self, data, index, out_path, uid, parent, bar=None):
        """commit -z -t of the RW layer; `bar` counts the LSMT bytes fed to
        the compressor (its total is the data plus the 4 KiB header; the
        index and trailer come on top, so it ends a little past 100 %)."""
        layer = RWLayer.open(data, index)
        try:
            files = [layer.backing]
            header = commit.layer_info(files, uid, parent)
            records = layer.index.records()
            out = Output(out_path, use_zfile=True, use_tar=True, algo=zfile.ALGOS[self.o.algorithm],
                         bs=self.o.bs_kb * 1024, threads=self.o.compress_threads,
                         overwrite_header=True)
            bar = bar or null_bar()
            bar.set_total(HT_SPACE + SECTOR * sum(rec[1] for rec in records if not rec[3]))
            try:
                commit.compact(records, files, _CountingSink(out, bar), header)
                out.close()
            finally:
                out.abort()
        finally:
            layer.close()

    def _report(self, s):
        """The per-layer table (sizes, reuse, seconds per step), then the
        totals line."""
        new = [r for r in s.layers if not r.reused]
        tar_bytes = sum(r.tar_bytes for r in new)
        self.say(f"pushed {s.dst} {s.manifest_digest}")
        for line in table(SUMMARY_HEADERS, _summary_rows(s)):
            self.say(line)
        rate = f", {tar_bytes / s.seconds / 1e6:.1f} MB/s of tar overall" \
            if s.seconds and tar_bytes else ""
        self.say(f"summary: {len(s.layers)} layers ({len(new)} converted, "
                 f"{len(s.layers) - len(new)} reused){' + base layer' if s.base else ''}; "
                 f"source {human(sum(r.source_size for r in s.layers))} -> overlaybd "
                 f"{human(_out_bytes(s))}; {human(tar_bytes)} of tar applied; "
                 f"{s.seconds:.2f} s total{rate}")


class _CountingSink:
    """A write() sink that passes everything to `out` and counts it on a bar."""

    def __init__(self, out, bar):
        self.out, self.bar = out, bar

    def write(self, data):
        n = self.out.write(data)
        self.bar.update(len(data))
        return n


SUMMARY_HEADERS = ("layer", "source", "tar", "overlaybd", "reused", "download", "apply",
                   "compress", "upload")


def _out_bytes(s):
    return sum(r.size for r in s.layers) + (s.base[1] if s.base else 0)


def _summary_rows(s):
    """Rows of the summary table: the base layer, each layer, the totals
    (tar bytes and seconds are the converted layers')."""
    def sec(x):
        return f"{x:.2f} s"
    n = len(s.layers)
    rows = []
    if s.base:
        rows.append(("base", "-", "-", human(s.base[1]), "no" if s.base_uploaded else "present",
                     "-", "-", "-", sec(s.base_upload_s)))
    for r in s.layers:
        if r.reused:
            rows.append((f"{r.index + 1}/{n}", human(r.source_size), "-", human(r.size), r.reused,
                         "-", "-", "-", "-"))
        else:
            rows.append((f"{r.index + 1}/{n}", human(r.source_size), human(r.tar_bytes),
                         human(r.size), "no", sec(r.download_s), sec(r.apply_s), sec(r.commit_s),
                         sec(r.upload_s)))
    new = [r for r in s.layers if not r.reused]
    rows.append(("total", human(sum(r.source_size for r in s.layers)),
                 human(sum(r.tar_bytes for r in new)), human(_out_bytes(s)),
                 f"{n - len(new)}/{n}", sec(sum(r.download_s for r in new)),
                 sec(sum(r.apply_s for r in new)), sec(sum(r.commit_s for r in new)),
                 sec(sum(r.upload_s for r in new) + s.base_upload_s)))
    return rows


def _layer_desc(media_type, digest, size):
    return {"mediaType": media_type, "digest": digest, "size": size,
            "annotations": {imageref.A_BLOB_DIGEST: digest, imageref.A_BLOB_SIZE: str(size),
                            imageref.A_PREFIX + "version": OBD_VERSION}}


def convert(src, dst, opts=None, out=None):
    """Convert the image src into the overlaybd image dst; returns a Summary."""
    if opts is not None and opts.turbo:
        raise UsageError("Options.turbo: TurboOCI conversion is tcmu_obd.build.convert_turbo.convert")
    conv = Converter(opts or Options(), out)
    return conv.run(src, dst)
