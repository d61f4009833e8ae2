"""overlaybd-create: make a new writable layer (append-only pair, sparse, raw,
or with --turboOCI a TurboOCI warp layer: tcmu_obd.image.warp_rw)."""
import argparse
import logging
import os
import sys

from tcmu_obd.errors import UsageError
from tcmu_obd.image.rw import RWLayer
from tcmu_obd.cli.common import run, setup_logging

GiB = 1 << 30


def parser():
    p = argparse.ArgumentParser(prog="overlaybd-create", description="Create a writable overlaybd layer.")
    p.add_argument("-u", "--parent-uuid", dest="parent_uuid", default="",
                   help="parent UUID (not used with --turboOCI)")
    p.add_argument("-s", "--sparse", action="store_true",
                   help="sparse data file (index file stays empty); ignored with --turboOCI")
    p.add_argument("--turboOCI", "--fastoci", dest="turbo", action="store_true",
                   help="TurboOCI warp layer: data_file is the raw sparse fs-metadata file (vsize "
                        "bytes), index_file its LSMT index (--fastoci: deprecated alias)")
    p.add_argument("--raw", action="store_true", help="plain data file of vsize bytes (not LSMT)")
    p.add_argument("--mkfs", action="store_true", help="make ext4 on the new layer")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("data_file")
    p.add_argument("index_file")
    p.add_argument("vsize", type=int, help="virtual size in GiB")
    return p


def body(argv):
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.vsize < 0:
        raise UsageError(f"vsize {args.vsize}: must not be negative")
    vsize = args.vsize * GiB
    if args.turbo:
        return _turbo(args, vsize)
    if args.raw:
        fd = os.open(args.data_file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(fd, vsize)
        os.close(fd)
        return 0
    layer = RWLayer.create(args.data_file, args.index_file, vsize, args.parent_uuid, args.sparse)
    layer.close()
    if args.mkfs:
        # overlaybd makes ext4 in userspace; we use the kernel's mkfs.ext4 on
        # a TCMU or FUSE + loop device, with overlaybd's options (tcmu_obd.build.apply.MKFS_CMD)
        from tcmu_obd.build.apply import mkfs_layer
        mkfs_layer(args.data_file, args.index_file)
    return 0


def _turbo(args, vsize):
    """overlaybd's create_warpfile: -s is ignored, -u is not passed on (as there)."""
    from tcmu_obd.image.warp_rw import WarpRWLayer
    if args.raw:
        raise UsageError("--raw and --turboOCI cannot be used together")
    if vsize == 0:
        raise UsageError("vsize 0: a TurboOCI warp layer needs a size")
    if args.sparse:
        logging.getLogger("overlaybd-create").info("-s is ignored with --turboOCI")
    if args.parent_uuid:
        logging.getLogger("overlaybd-create").warning("-u is not used with --turboOCI (as in overlaybd)")
    WarpRWLayer.create(args.data_file, args.index_file, vsize).close()
    if args.mkfs:
        from tcmu_obd.build.turbo import mkfs_warp
        mkfs_warp(args.data_file, args.index_file)
    return 0


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
