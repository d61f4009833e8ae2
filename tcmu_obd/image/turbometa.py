"""TurboOCI images from a registry: the config.v1.json lowers the overlaybd
snapshotter writes for them.  A TurboOCI layer is the image's original layer
(left as it is in the registry) plus a small meta blob, `turboOCIv1.tar.gz`,
holding `<fstype>.fs.meta` (the file system's metadata as a warp layer),
`.turbo.ociv1` (a marker) and, when the original layer is gzip, `gzip.meta`
(its gzip index).  Like the snapshotter, this fetches each meta blob whole,
unpacks it into the layer's dir and writes a lower
`{dir, file: <dir>/<fstype>.fs.meta, targetDigest: <original layer>,
gzipIndex: <dir>/gzip.meta}`; the original layer is then read lazily, by
range, from `repoBlobUrl/<targetDigest>`.

The fstype is chosen as the snapshotter does: the first of erofs, ext4 whose
meta file the bottom TurboOCI layer has (erofs only where the kernel mounts
erofs), and every layer above uses the same file name.

It does not read the layers (tcmu_obd.image.assemble does) nor make TurboOCI
images (tcmu_obd.build.convert)."""
import logging
import os
import tarfile
import zlib

from tcmu_obd.core import fileio
from tcmu_obd.errors import ManifestError, UsageError
from tcmu_obd.remote import blobs

log = logging.getLogger(__name__)

META_NAMES = ("ext4.fs.meta", "erofs.fs.meta", ".turbo.ociv1", "gzip.meta")
FS_PREFERENCE = ("erofs", "ext4")          # the snapshotter's turboFsType default
_STAMP = ".tcmu-obd-meta-digest"           # which meta blob a dir holds (so a second run reuses it)
CHUNK = 1 << 20
# what tarfile and the decompressors it uses raise on a damaged archive
_DAMAGE = (tarfile.TarError, OSError, EOFError, zlib.error,
           ValueError)      # tarfile: a GNU sparse 1.0 map that is not numbers


def kernel_has_erofs():
    try:
        with open("/proc/filesystems", encoding="ascii", errors="replace") as f:
            return any(line.split()[-1:] == ["erofs"] for line in f)
    except OSError:
        return False


def is_gzip_media_type(media_type):
    return media_type.endswith(("+gzip", ".gzip"))


def _write_member(src, path):
    """Copy a member's bytes to path in pieces (never the whole member in
    memory), through a synced temporary file and a rename."""
    fileio.write_atomic(path, src, 0o644, prefix=".meta-")


def unpack_meta(archive, layer_dir, where):
    """Unpack a turboOCIv1.tar.gz into layer_dir: only the known names, as
    regular (not sparse) files at the archive's root; anything else is
    refused by name.  The compressed stream is read to its end, so its
    trailer (gzip's CRC and length) is checked; a damaged archive is a
    ManifestError, and the files it left are not stamped (fetch_meta)."""
    try:
        with open(archive, "rb") as f:
            magic = f.read(2)
        # gzip (what accelerated-container-image writes) or a plain tar, nothing
        # else: tarfile's "r:*" would also try xz, whose header alone can make
        # liblzma allocate a 4 GiB dictionary
        tf = tarfile.open(archive, "r:gz" if magic == b"\x1f\x8b" else "r:")
    except _DAMAGE as e:
        raise ManifestError(f"{where}: cannot open the TurboOCI meta archive: {e}") from None
    seen = set()
    with tf:
        try:
            for m in tf:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if m.isdir() and name in ("", "."):
                    continue
                if name not in META_NAMES or not m.isfile():
                    raise ManifestError(f"{where}: TurboOCI meta archive member {m.name!r} "
                                        f"(type {m.type!r}): expected regular files named "
                                        f"{', '.join(META_NAMES)}")
                if m.issparse():
                    raise ManifestError(f"{where}: TurboOCI meta archive member {m.name!r} is a sparse "
                                        f"file (type {m.type!r}, {m.size} bytes): expected a regular file")
                if name in seen:
                    raise ManifestError(f"{where}: TurboOCI meta archive has {name!r} twice")
                seen.add(name)
                _write_member(tf.extractfile(m), os.path.join(layer_dir, name))
            while tf.fileobj.read(CHUNK):      # to the end: the trailer's checks run there
                pass
        except _DAMAGE as e:
            raise ManifestError(f"{where}: TurboOCI meta archive is damaged: {e}") from None
    if not any(n.endswith(".fs.meta") for n in seen):
        raise ManifestError(f"{where}: TurboOCI meta archive has no ext4.fs.meta or erofs.fs.meta "
                            f"(members: {sorted(seen) or 'none'})")
    return seen


def fetch_meta(client, ref, info, layer_dir):
    """Make sure layer_dir holds the unpacked meta blob `info["meta"]`."""
    where = f"{ref.repo_blob_url} layers[{info['index']}]"
    os.makedirs(layer_dir, exist_ok=True)
    stamp = os.path.join(layer_dir, _STAMP)
    try:
        with open(stamp, encoding="ascii") as f:
            if f.read().strip() == info["meta"]:
                return
    except FileNotFoundError:
        pass
    tmp = os.path.join(layer_dir, ".turboOCIv1.tar.gz.part")
    try:
        blobs.download_blob(client, ref, info["meta"], tmp)
        unpack_meta(tmp, layer_dir, where)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fileio.write_atomic(stamp, info["meta"].encode() + b"\n", 0o644, prefix=".stamp-")


def resolve(client, ref, lowers, dir_root, fs_preference=FS_PREFERENCE, erofs_ok=None):
    """Replace the TurboOCI placeholders of imageref.overlaybd_lowers(...,
    turbo_ok=True) by real lowers, fetching and unpacking each meta blob into
    dir_root/<meta digest hex>.  Returns the new list."""
    if not any("_turbo" in low for low in lowers):
        return lowers
    if not dir_root:
        raise UsageError(f"{ref.repo_blob_url}: the image has TurboOCI layers, whose meta blobs are "
                         f"unpacked into a local dir: give one (--dir-root)")
    if erofs_ok is None:
        erofs_ok = kernel_has_erofs()
    out, fsmeta = [], None
    for low in lowers:
        info = low.get("_turbo")
        if info is None:
            out.append(low)
            continue
        layer_dir = os.path.join(dir_root, info["meta"].split(":", 1)[1])
        fetch_meta(client, ref, info, layer_dir)
        if fsmeta is None:
            have = [t for t in fs_preference if os.path.exists(os.path.join(layer_dir, f"{t}.fs.meta"))
                    and (t != "erofs" or erofs_ok)]
            if not have:
                raise ManifestError(f"{ref.repo_blob_url} layers[{info['index']}]: TurboOCI meta has no "
                                    f"usable meta file (erofs needs a kernel with erofs; "
                                    f"found: {sorted(os.listdir(layer_dir))})")
            fsmeta = f"{have[0]}.fs.meta"
        path = os.path.join(layer_dir, fsmeta)
        if not os.path.exists(path):
            raise ManifestError(f"{ref.repo_blob_url} layers[{info['index']}]: TurboOCI meta has no "
                                f"{fsmeta}, which the layers below use")
        lower = {"dir": layer_dir, "file": path, "targetDigest": info["target"]}
        if is_gzip_media_type(info["media_type"]):
            gz = os.path.join(layer_dir, "gzip.meta")
            if not os.path.exists(gz):
                raise ManifestError(f"{ref.repo_blob_url} layers[{info['index']}]: the original layer "
                                    f"is {info['media_type']} but the TurboOCI meta has no gzip.meta")
            lower["gzipIndex"] = gz
        out.append(lower)
    log.info("%s: TurboOCI layers use %s", ref.repo_blob_url, fsmeta)
    return out
