"""turboOCI-apply: write the ext4 metadata of a layer tar into a TurboOCI
warp layer, file contents mapped to the tar (docs/operations.md,
turboOCI-apply), with overlaybd's flags so accelerated-container-image's
convertor can drive it.  The work is done by tcmu_obd.build.turbo; this is
only the command line."""
import argparse
import sys

from tcmu_obd.build import turbo
from tcmu_obd.cli.common import run, setup_logging


def parser():
    p = argparse.ArgumentParser(prog="turboOCI-apply",
                                description="Apply a layer tar's metadata onto a TurboOCI warp layer.")
    p.add_argument("--mkfs", action="store_true", help="make ext4 on the image first")
    p.add_argument("--fstype", default="ext4", help="ext4 (default) or erofs (no kernel mount; --mkfs is for ext4 only)")
    p.add_argument("--service_config_path", default=None,
                   help=f"global overlaybd.json (default {turbo.DEFAULT_SERVICE_CONFIG}; a path given "
                        "must exist, the default one missing means built-in defaults)")
    p.add_argument("--gz_index_path", default=turbo.DEFAULT_GZ_INDEX,
                   help="where to write the gzip index of a gzip input (default gzip.meta)")
    p.add_argument("--import", dest="import_dump", action="store_true",
                   help="input_path is a header dump made by --export (tar checksums not checked)")
    p.add_argument("--export", action="store_true",
                   help="only dump the tar headers (with content offsets) to image_config_path")
    p.add_argument("--frontend", choices=("auto", "tcmu", "fuse"), default=None,
                   help="the block device for the kernel's ext4 (default auto, or $TCMU_OBD_FRONTEND)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("input_path", help="layer tar (plain, gzip or ZFile), or a header dump with --import")
    p.add_argument("image_config_path", nargs="?", default=None,
                   help="config.v1.json whose upper is a warp layer (upper.target); with --export "
                        "the dump to write")
    return p


def body(argv):
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    svc = None
    if not args.export:
        svc = turbo.load_service_config(args.service_config_path or turbo.DEFAULT_SERVICE_CONFIG,
                                        explicit=args.service_config_path is not None)
    res = turbo.turbo_apply(args.input_path, args.image_config_path, mkfs_first=args.mkfs,
                            fstype=args.fstype, gz_index_path=args.gz_index_path,
                            import_dump=args.import_dump, export=args.export, service_cfg=svc,
                            frontend=args.frontend)
    print(f"turboOCI-apply: {res.entries} entries, {res.files} files mapped ({res.mappings} "
          f"mappings, {res.patched} extents made written), {res.tar_bytes} tar bytes "
          f"({res.compression}{', index ' + res.gz_index if res.gz_index else ''}), {res.seconds:.2f} s"
          f"{', through ' + res.frontend if res.frontend else ''}", file=sys.stderr)
    print("turboOCI-apply done")
    return 0


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
