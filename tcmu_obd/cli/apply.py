"""overlaybd-apply: unpack an OCI layer tar (plain, gzip, zstd; a file, a
FIFO or `-` for stdin) into the ext4 of an image's writable upper layer
(docs/operations.md, overlaybd-apply).  The work is done by tcmu_obd.build.apply."""
import argparse
import os
import sys

from tcmu_obd.build import apply, untar
from tcmu_obd import service_config
from tcmu_obd.errors import UnsupportedError, UsageError
from tcmu_obd.cli.common import run, setup_logging


def parser():
    p = argparse.ArgumentParser(prog="overlaybd-apply",
                                description="Apply an OCI layer tar onto the upper layer of an image.")
    p.add_argument("--raw", action="store_true", help="image_config is a raw image file, not a config.v1.json")
    p.add_argument("--mkfs", action="store_true", help="make ext4 on the image first (overlaybd's options)")
    p.add_argument("--checksum", default="", metavar="sha256:HEX",
                   help="sha256 of the uncompressed tar; a mismatch is an error")
    p.add_argument("--service_config_path", "--service-config", dest="service_config",
                   default=None,
                   help="global overlaybd.json for remote lowers; a path given must exist (without "
                        "the option: the default path when present, else built-in defaults)")
    p.add_argument("--gz_index_path", default="",
                   help="also write the gzip index (ddgzidx) of a gzip input here; with a TurboOCI "
                        "warp upper (upper.target) the apply is turboOCI-apply's meta-only one")
    p.add_argument("--from_qcow2", action="store_true", help="(not supported)")
    p.add_argument("--no-extract-rootfs", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--frontend", choices=("auto", "tcmu", "fuse"), default=None,
                   help="the block device for the kernel's ext4: TCMU where the kernel has it, else "
                        "FUSE + loop (default auto, or $TCMU_OBD_FRONTEND)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary line on stderr")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("input", help="layer tar (plain, gzip or zstd); a FIFO, or - for stdin")
    p.add_argument("image_config", help="config.v1.json with an upper layer (or a raw image with --raw)")
    return p


def body(argv):
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.from_qcow2:
        raise UnsupportedError("--from_qcow2: qcow2 input is not supported")
    checksum = untar.check_checksum(args.checksum)
    svc = service_config.load_given(args.service_config)     # checked even with --raw
    if args.raw:
        svc = None
    if args.gz_index_path and not args.raw:
        from tcmu_obd.image import config
        if config.load(args.image_config, warp_upper=True).upper.get("target"):
            return _turbo(args, svc)
    if args.gz_index_path:
        _gz_index(args.input, args.gz_index_path)
    res = apply.apply_layer(args.input, args.image_config, mkfs_first=args.mkfs, checksum=checksum,
                            raw=args.raw, service_cfg=svc, frontend=args.frontend)
    if not args.quiet:
        rate = res.tar_bytes / res.seconds / 1e6 if res.seconds else 0.0
        print(f"overlaybd-apply: {res.entries} entries, {res.tar_bytes} tar bytes "
              f"({res.compression}, {res.input_bytes} read), {res.digest}, {res.seconds:.2f} s "
              f"({rate:.1f} MB/s){', through ' + res.frontend if res.frontend else ''}", file=sys.stderr)
    return 0


def _gz_index(path, out_path):
    """The gzip index of a gzip input file (a pass of its own, before the apply)."""
    if path == "-" or not os.path.isfile(path):
        raise UsageError(f"--gz_index_path needs the input as a regular file, not {path!r}")
    with open(path, "rb") as f:
        if f.read(2) != untar.GZIP_MAGIC:
            return              # not gzip: no index (as overlaybd)
        f.seek(0)
        from tcmu_obd.format.gzindex import build_index
        build_index(f, out_path, name=path)


def _turbo(args, svc):
    """overlaybd-apply onto a warp upper: the meta-only apply of turboOCI-apply."""
    from tcmu_obd.build import turbo
    if args.checksum:
        raise UsageError("--checksum cannot be used with a TurboOCI warp upper")
    res = turbo.turbo_apply(args.input, args.image_config, mkfs_first=args.mkfs,
                            gz_index_path=args.gz_index_path, service_cfg=svc, frontend=args.frontend)
    if not args.quiet:
        print(f"overlaybd-apply: {res.entries} entries, {res.files} files mapped to the tar, "
              f"{res.tar_bytes} tar bytes ({res.compression}), {res.seconds:.2f} s", file=sys.stderr)
    return 0


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
