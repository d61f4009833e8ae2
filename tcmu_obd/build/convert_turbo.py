"""`tcmu-obd convert --turboOCI`: an OCI/Docker image -> a TurboOCI image
(docs/operations.md, convert --turboOCI).  Each layer keeps its original
blob; what is added is a small meta blob per layer, turboOCIv1.tar.gz, that
tcmu_obd.image.turbometa unpacks and serves over the original (read by range).

Per source layer, in its work dir: the original blob is downloaded as it is
(layer.tar, gzip or plain; its uncompressed sha256 checked against the
config's diff_id); a warp layer (64 GiB unless --vsize) gets the
file system metadata through turboOCI-apply (tcmu_obd.build.turbo; ext4 with
mkfs on layer 0, or erofs), over the TurboOCI layers below as lowers
{file: <fs>.fs.meta, targetFile: layer.tar, gzipIndex: gzip.meta}; the gzip
index is built in the same pass; the warp layer is committed (ZFile, no tar
wrapper) to <fs>.fs.meta; the meta blob is the gzip'd tar of <fs>.fs.meta,
an empty .turbo.ociv1 and gzip.meta (gzip layers) at the archive root.  The
config's diff_ids are the sha256 of each UNCOMPRESSED meta tar; each layer
descriptor is the meta blob's, with the TurboOCI annotations naming the
original blob.  The original blobs are not re-uploaded to the source
repository; for another repository of the same registry they are mounted
cross-repository, else uploaded from the work dir (the lowers read them from
the destination repository).

Not here: a layer database (the meta blobs are not reproducible, as in the
Go convertor), zstd layers (no index to read them by range: refused), the
native conversion (tcmu_obd.build.convert, whose helpers this reuses).
"""
import gzip
import hashlib
import json
import os
import tarfile
from dataclasses import replace

from tcmu_obd.build import convert as native
from tcmu_obd.build.progress import human
from tcmu_obd.errors import ObdError, UsageError
from tcmu_obd.format import zfile
from tcmu_obd.image import commit
from tcmu_obd.image.output import Output
from tcmu_obd.remote import distribution, imageref
from tcmu_obd.remote.blobs import download_blob, mount_blob, sha256_file, upload_bytes, upload_file

TURBO_VERSION = "0.1.0-turbo.ociv1"
META_BLOB = "turboOCIv1.tar.gz"
MARKER = ".turbo.ociv1"
GZ_META = "gzip.meta"
FSTYPES = ("ext4", "erofs")
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
A_TARGET = imageref.A_PREFIX + "turbo-oci/target-digest"
A_TARGET_MEDIA = imageref.A_PREFIX + "turbo-oci/target-media-type"


def meta_archive(ldir, names, out_path):
    """turboOCIv1.tar.gz of `names` (files in ldir) at the archive root;
    returns the sha256 of the uncompressed tar (the layer's diff_id)."""
    tar_path = out_path + ".tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in names:
            path = os.path.join(ldir, name)
            info = tarfile.TarInfo(name)
            info.size = os.path.getsize(path)
            info.mode, info.mtime, info.uid, info.gid = 0o644, 0, 0, 0
            with open(path, "rb") as f:
                tf.addfile(info, f)
    diff_id = sha256_file(tar_path)
    with open(tar_path, "rb") as src, open(out_path, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            gz.write(chunk)
    os.unlink(tar_path)
    return diff_id


def uncompressed_digest(path):
    """sha256 of the layer blob at path, gunzipped when it is gzip."""
    h = hashlib.sha256()
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        try:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
        except (OSError, EOFError) as e:
            raise native.ConvertError(f"{path}: corrupt gzip layer: {e}") from None
    return "sha256:" + h.hexdigest()


class TurboConverter(native.Converter):
    def __init__(self, opts, out=None):
        super().__init__(opts, out)
        if opts.fstype not in FSTYPES:
            raise UsageError(f"--fstype {opts.fstype!r}: must be ext4 or erofs")

    def _convert(self, client, db, src, dst, work):
        from tcmu_obd import service_config
        o = self.o
        manifest, where, config, src_diff_ids = self._source(client, src)
        layers = manifest["layers"]
        for i, layer in enumerate(layers):
            if layer["mediaType"].endswith("zstd"):
                raise native.ConvertError(f"{where}: layers[{i}] is zstd ({layer['mediaType']}): "
                                          "TurboOCI reads layers by range through a gzip index; "
                                          "only gzip and plain tar layers can be converted")
        n = len(layers)
        svc = o.service_config or service_config.load(None)
        self.say(f"{where}: {n} layers, {human(sum(int(l.get('size', 0)) for l in layers))} "
                 f"-> {dst} (TurboOCI, {o.fstype}, {human(o.vsize)} warp layers)")
        results = [native.LayerResult(i, l["digest"], int(l.get("size", 0))) for i, l in enumerate(layers)]
        lowers, descs, diff_ids = [], [], []
        gz_type = native.OCI_LAYER_TAR + "+gzip" if o.oci else DOCKER_LAYER_GZIP
        for r, layer in zip(results, layers):
            i = r.index
            ldir = os.path.join(work, f"{i:04d}")
            os.makedirs(ldir)
            label, tag = f"layer {i + 1}/{n}", f"[{i + 1}/{n}] {r.source_digest[:19]}…"
            target = os.path.join(ldir, "layer.tar")
            with self.progress.task(f"{label} download", r.source_size) as bar:
                download_blob(client, src, r.source_digest, target, bar)
            r.download_s = bar.elapsed
            got = uncompressed_digest(target)
            if got != src_diff_ids[i]:
                raise native.ConvertError(f"{where}: layers[{i}] ({r.source_digest}): the uncompressed "
                                          f"layer is {got}, but config rootfs.diff_ids[{i}] = "
                                          f"{src_diff_ids[i]}")
            lower, res = self._meta_layer(r, ldir, target, lowers, svc, label)
            lowers.append(lower)
            r.tar_bytes, r.entries = res.tar_bytes, res.entries
            names = [f"{o.fstype}.fs.meta", MARKER] + ([GZ_META] if "gzipIndex" in lower else [])
            blob = os.path.join(ldir, META_BLOB)
            diff_ids.append(meta_archive(ldir, names, blob))
            r.digest, r.size = sha256_file(blob), os.path.getsize(blob)
            with self.progress.task(f"{label} upload", r.size) as bar:
                _, r.uploaded = upload_file(client, dst, blob, r.digest, bar)
                self._original_to(client, src, dst, r.source_digest, target)
            r.upload_s = bar.elapsed
            descs.append({"mediaType": gz_type, "digest": r.digest, "size": r.size,
                          "annotations": {imageref.A_PREFIX + "version": TURBO_VERSION,
                                          imageref.A_BLOB_DIGEST: r.digest,
                                          imageref.A_BLOB_SIZE: str(r.size),
                                          A_TARGET: r.source_digest,
                                          A_TARGET_MEDIA: layer["mediaType"]}})
            self.say(f"{tag} {human(r.source_size)} {res.compression}, {r.entries} entries -> "
                     f"meta {r.digest[:19]}… {human(r.size)}")

        new_config = dict(config)
        rootfs = dict(config.get("rootfs") or {})
        rootfs["diff_ids"] = diff_ids
        new_config["rootfs"] = rootfs
        config_bytes = imageref.go_json(new_config).encode()
        config_digest = upload_bytes(client, dst, config_bytes)
        doc = {"schemaVersion": 2,
               "mediaType": native.OCI_MANIFEST if o.oci else native.DOCKER_MANIFEST,
               "config": {"mediaType": native.OCI_CONFIG if o.oci else native.DOCKER_CONFIG,
                          "digest": config_digest, "size": len(config_bytes)},
               "layers": descs}
        mbytes = imageref.go_json(doc).encode()
        mdigest = distribution.push_manifest(client, dst.base, dst.ref, mbytes, doc["mediaType"])
        return native.Summary(str(src), str(dst), mdigest, mbytes, config_digest, results)

    def _meta_layer(self, r, ldir, target, lowers, svc, label):
        """The warp layer of one source layer, applied and committed to
        <fstype>.fs.meta; returns (its lower entry, the TurboResult)."""
        from tcmu_obd.build import turbo
        from tcmu_obd.image.warp_rw import TAG_REMOTE, WarpRWLayer
        from tcmu_obd.format import lsmt
        o = self.o
        data, index = os.path.join(ldir, "writable_data"), os.path.join(ldir, "writable_index")
        WarpRWLayer.create(data, index, o.vsize).close()
        cfg_path = os.path.join(ldir, "config.json")
        with open(cfg_path, "w") as f:
            # no upper.gzipIndex: it is written by this apply (the tools never read mapped data)
            json.dump({"lowers": lowers, "upper": {"data": data, "index": index, "target": target},
                       "resultFile": ""}, f)
        gz_meta = os.path.join(ldir, GZ_META)
        with self.progress.task(f"{label} apply", r.source_size) as ap:
            try:
                res = turbo.turbo_apply(target, cfg_path, mkfs_first=o.fstype == "ext4" and r.index == 0,
                                        fstype=o.fstype, gz_index_path=gz_meta, service_cfg=svc,
                                        workdir=ldir, progress=lambda k: ap.set_note(f"{k} entries"))
            except ObdError as e:
                raise native.ConvertError(f"layer {r.index} ({r.source_digest}): {e}") from None
            ap.close(note=f"{res.compression} -> {human(res.tar_bytes)} tar, {res.entries} entries")
        r.apply_s = ap.elapsed
        meta = os.path.join(ldir, f"{o.fstype}.fs.meta")
        with self.progress.task(f"{label} compress") as bar:
            layer = WarpRWLayer.open(data, index)
            try:
                h = layer.header
                header = lsmt.LsmtHeader(lsmt.FLAG_HEADER | lsmt.FLAG_DATA | lsmt.FLAG_SEALED, 0, 0,
                                         layer.vsize, h.uuid, h.parent_uuid, b"")
                out = Output(meta, use_zfile=True, use_tar=False, algo=zfile.ALGOS[o.algorithm],
                             bs=o.bs_kb * 1024, threads=o.compress_threads, overwrite_header=True)
                try:
                    commit.compact(layer.records(), [layer.backing], out, header, remote_tag=TAG_REMOTE)
                    out.close()
                finally:
                    out.abort()
            finally:
                layer.close()
            os.unlink(data)
            os.unlink(index)
            bar.close(note=f"-> {human(os.path.getsize(meta))} {o.fstype}.fs.meta")
        r.commit_s = bar.elapsed
        open(os.path.join(ldir, MARKER), "wb").close()
        lower = {"file": meta, "targetFile": target}
        if res.gz_index:
            lower["gzipIndex"] = gz_meta
        return lower, res

    def _original_to(self, client, src, dst, digest, path):
        """The original blob in the destination repository: already there when
        it is the source repository, else mounted from it, else uploaded."""
        if (src.host, src.repo) == (dst.host, dst.repo):
            return "source"
        if src.host == dst.host and mount_blob(client, dst, digest, src.repo):
            return "mounted"
        upload_file(client, dst, path, digest)
        return "uploaded"


def convert(src, dst, opts, out=None):
    """Convert the image src into the TurboOCI image dst (opts.turbo set);
    returns a Summary.  No layer database: TurboOCI conversion is not reused."""
    return TurboConverter(replace(opts, db_path="none"), out).run(src, dst)
