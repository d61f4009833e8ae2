"""overlaybd-create: make a new writable layer (append-only pair, sparse, or raw)."""
import argparse
import os
import sys

from tcmu_obd.errors import UnsupportedError, UsageError
from tcmu_obd.image.rw import RWLayer
from tcmu_obd.cli.common import run, setup_logging

GiB = 1 << 30


def parser():
    p = argparse.ArgumentParser(prog="overlaybd-create", description="Create a writable overlaybd layer.")
    p.add_argument("-u", "--parent-uuid", dest="parent_uuid", default="", help="parent UUID")
    p.add_argument("-s", "--sparse", action="store_true", help="sparse data file (index file stays empty)")
    p.add_argument("--turboOCI", "--fastoci", dest="turbo", action="store_true", help="TurboOCI warp layer")
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
    if args.turbo:
        raise UnsupportedError("--turboOCI / --fastoci: TurboOCI layers are not yet supported")
    if args.vsize < 0:
        raise UsageError(f"vsize {args.vsize}: must not be negative")
    vsize = args.vsize * GiB
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


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
