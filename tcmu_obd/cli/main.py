"""The `tcmu-obd` command: info, export, read and demo open an image (a
config.v1.json, or a single layer file) through the library and print or
write what they find; push-layer uploads a file as a registry blob;
image-config turns an overlaybd image's manifest into the config.v1.json the
snapshotter would write for it (docs/runtime.md, Device config from a manifest).  No layer format
logic lives here."""
import argparse
import json
import os
import sys

from tcmu_obd.image import baselayer
from tcmu_obd.remote import distribution, imageref, registry
from tcmu_obd.format import ext4
from tcmu_obd import service_config
from tcmu_obd.errors import UsageError
from tcmu_obd.image.layer import open_layer
from tcmu_obd.format.lsmt import SECTOR
from tcmu_obd.cli.common import common_parent, open_target, run, setup_logging

EXPORT_CHUNK = 4 << 20


def layer_info(path):
    layer = open_layer(path)
    try:
        recs = layer.index.records()
        info = {
            "file": path,
            "size": os.fstat(layer.fd).st_size,
            "wrappers": layer.wrappers,
            "uuid": layer.trailer.uuid,
            "parent_uuid": layer.trailer.parent_uuid,
            "virtual_size": layer.trailer.virtual_size,
            "user_tag": layer.trailer.user_tag.decode("utf-8", "replace"),
            "header_flags": f"0x{layer.header.flags:02x}",
            "trailer_flags": f"0x{layer.trailer.flags:02x}",
            "version": f"{layer.trailer.version}.{layer.trailer.sub_version}",
            "index_offset": layer.trailer.index_offset,
            "index_size": layer.trailer.index_size,
            "records": len(recs),
            "data_records": sum(1 for r in recs if not r[3]),
            "zeroed_records": sum(1 for r in recs if r[3]),
            "data_bytes": layer.index.data_sectors() * SECTOR,
        }
        if layer.tar_extent:
            info["tar_payload"] = {"offset": layer.tar_extent[0], "size": layer.tar_extent[1]}
        if layer.zinfo is not None:
            z = layer.zinfo
            info["zfile"] = {"algorithm": {1: "lz4", 2: "zstd"}[z.algo], "block_size": z.block_size,
                             "blocks": z.index_size, "original_size": z.original_file_size,
                             "verify": bool(z.verify)}
        return info
    finally:
        layer.close()


def cmd_info(args):
    info = layer_info(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, val in info.items():
        if isinstance(val, dict):
            val = ", ".join(f"{k}={v}" for k, v in val.items())
        print(f"{key:16} {val}")
    return 0


def cmd_export(args):
    image = open_target(args.config, args.service_config)
    try:
        vsize = image.virtual_size
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, vsize)
            written = 0
            for off, length, _moff, zeroed, _tag in image.effective_records():
                if zeroed:
                    continue        # zeros stay holes
                pos, end = off * SECTOR, min((off + length) * SECTOR, vsize)
                while pos < end:
                    n = min(EXPORT_CHUNK, end - pos)
                    data = image.read(pos, n)
                    os.pwrite(fd, data, pos)
                    pos += n
                    written += n
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        image.close()
    print(f"{args.out}: {vsize} bytes virtual, {written} bytes of data written", file=sys.stderr)
    return 0


def cmd_read(args):
    image = open_target(args.config, args.service_config)
    try:
        sys.stdout.buffer.write(image.pread(args.offset, args.length))
        sys.stdout.buffer.flush()
    finally:
        image.close()
    return 0


def cmd_demo(args):
    """Open the built-in base layer as an image and show what is in it."""
    path = args.image or baselayer.path()
    image = open_target(path, args.service_config)
    try:
        print(f"image           {path}")
        print(f"virtual size    {image.virtual_size} bytes ({image.virtual_size / 2**30:.1f} GiB)")
        print(f"layers          {len(image.lowers)} read-only"
              + (", 1 writable" if image.upper else ""))
        for i, layer in enumerate(image.lowers):
            print(f"  [{i}] {layer.path}: uuid {layer.trailer.uuid}, "
                  f"{'+'.join(layer.wrappers + ['lsmt'])}, {len(layer.index)} records, "
                  f"{layer.index.data_sectors() * SECTOR} data bytes")
        sb = ext4.superblock(image.pread)
        if sb is None:
            print("ext4            no ext4 superblock at byte 1024")
            return 1
        print(f"ext4            magic {sb['magic']} at byte 1080, {sb['blocks']} blocks of "
              f"{sb['block_size']} bytes ({sb['size_bytes'] / 2**30:.1f} GiB), "
              f"{sb['free_blocks']} free, {sb['inodes']} inodes, uuid {sb['uuid']}")
    finally:
        image.close()
    return 0


# -- registry references ----------------------------------------------------------------------

def registry_client(args):
    """A RegistryClient per the global config, or --cred-file's cred.json."""
    return imageref.client_from_service_config(service_config.load_given(args.service_config),
                                               args.cred_file)


def cmd_push_layer(args):
    repo = imageref.parse_ref(args.repo_url, args.plain_http, with_ref=False)
    if not os.path.isfile(args.file):
        raise UsageError(f"{args.file}: not a regular file")
    size = os.path.getsize(args.file)
    with registry_client(args) as client, open(args.file, "rb") as f:
        digest = distribution.upload_blob(client, repo.base + "/blobs/uploads/",
                                      iter(lambda: f.read(4 << 20), b""))
    url = registry.blob_url(repo.repo_blob_url, digest)
    if args.json:
        print(json.dumps({"digest": digest, "size": size, "repoBlobUrl": repo.repo_blob_url,
                          "url": url}, indent=2))
    else:
        print(f"{digest} {size}")
    return 0


def cmd_image_config(args):
    ref = imageref.parse_ref(args.ref, args.plain_http)
    platform = imageref.parse_platform(args.platform)
    with registry_client(args) as client:
        manifest, where = imageref.fetch_image_manifest(client, ref, platform)
    dir_root = os.path.abspath(args.dir_root) if args.dir_root else ""
    lowers = imageref.overlaybd_lowers(manifest, where, dir_root)
    doc = {"repoBlobUrl": ref.repo_blob_url, "lowers": lowers, "upper": {},
           "resultFile": os.path.abspath(args.result_file) if args.result_file else ""}
    imageref.write_atomic(args.out, imageref.go_json(doc).encode())
    print(f"{args.out}: {len(lowers)} lowers from {where} ({ref.repo_blob_url})", file=sys.stderr)
    return 0


def parser():
    p = argparse.ArgumentParser(prog="tcmu-obd", description="overlaybd-compatible block images.")
    common = common_parent()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", parents=[common], help="header, trailer, index and compression of a layer file")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("export", parents=[common], help="write the merged virtual disk as a sparse raw file")
    s.add_argument("config", help="config.v1.json, or a layer file")
    s.add_argument("out")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("read", parents=[common], help="bytes of the virtual disk to stdout")
    s.add_argument("config", help="config.v1.json, or a layer file")
    s.add_argument("offset", type=int)
    s.add_argument("length", type=int)
    s.set_defaults(fn=cmd_read)
    s = sub.add_parser("demo", parents=[common], help="open the built-in base layer (or IMAGE) and show what is in it")
    s.add_argument("image", nargs="?")
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("push-layer", parents=[common],
                       help="upload a file (e.g. a committed layer) as a blob to a registry repository")
    s.add_argument("file")
    s.add_argument("repo_url", metavar="REPO_URL",
                   help="http(s)://HOST[:PORT]/v2/REPO, or HOST[:PORT]/REPO (HTTP for localhost)")
    s.add_argument("--plain-http", action="store_true", help="use HTTP, not HTTPS")
    s.add_argument("--cred-file", "--cred_file_path", dest="cred_file", default="",
                   help="cred.json to use instead of the global config's credentials")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_push_layer)
    s = sub.add_parser("image-config", parents=[common],
                       help="write the config.v1.json the overlaybd snapshotter would for a "
                            "remote overlaybd image")
    s.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPO[:TAG] or HOST[:PORT]/REPO@sha256:...")
    s.add_argument("out", metavar="OUT.json")
    s.add_argument("--plain-http", action="store_true", help="use HTTP, not HTTPS")
    s.add_argument("--platform", default="linux/amd64",
                   help="OS/ARCH[/VARIANT] to pick from an index (default linux/amd64)")
    s.add_argument("--dir-root", default="", metavar="DIR",
                   help="give each lower the dir DIR/<digest hex>")
    s.add_argument("--result-file", default="", metavar="PATH", help="the config's resultFile")
    s.add_argument("--cred-file", "--cred_file_path", dest="cred_file", default="",
                   help="cred.json to use instead of the global config's credentials")
    s.set_defaults(fn=cmd_image_config)
    from tcmu_obd.cli import convert, mount, serve  # image building; FUSE + loop; TCMU daemon and devices
    from tcmu_obd.cli import install                # overlaybd's file layout
    mount.add_subcommands(sub, common)
    install.add_subcommands(sub, common)
    serve.add_subcommands(sub, common)
    convert.add_subcommands(sub, common)
    return p


def body(argv):
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    return args.fn(args)


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
