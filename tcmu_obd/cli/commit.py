"""overlaybd-commit: turn a writable layer into a committed layer (optionally
ZFile-compressed and tar-wrapped), seal it in place, or commit a sealed file;
with --upload, also stream the ZFile output to a registry as a blob."""
import argparse
import os
import sys

from tcmu_obd.image import commit
from tcmu_obd.format import lsmt
from tcmu_obd.errors import UsageError
from tcmu_obd.image.layer import unwrap
from tcmu_obd.image.rw import RWLayer
from tcmu_obd.cli.common import add_upload_args, algorithm, block_size, run, setup_logging, start_upload, write_output


def parser():
    p = argparse.ArgumentParser(prog="overlaybd-commit", description="Commit a writable overlaybd layer.")
    p.add_argument("-m", "--message", default="", help="commit message (user_tag, at most 256 bytes)")
    p.add_argument("--uuid", default="", help="UUID of the new layer")
    p.add_argument("-p", "--parent-uuid", "--parent_uuid", dest="parent_uuid", default="")
    p.add_argument("-z", "--compress", dest="zfile", action="store_true", help="ZFile output")
    p.add_argument("-t", "--tar", action="store_true", help="wrap the output in the one-file tar")
    p.add_argument("-f", "--force", action="store_true", help="remove an existing output first")
    p.add_argument("--algorithm", default=None, help="lz4 (default) or zstd")
    p.add_argument("--bs", type=int, default=None, help="ZFile block size in KiB (4..64)")
    p.add_argument("--turboOCI", "--fastoci", dest="turbo", action="store_true")
    p.add_argument("--seal", action="store_true", help="seal data_file in place")
    p.add_argument("--commit_sealed", action="store_true", help="data_file is sealed; 2nd arg is the output")
    p.add_argument("--compress_threads", type=int, default=1)
    add_upload_args(p)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("data_file")
    p.add_argument("index_file", nargs="?")
    p.add_argument("commit_file", nargs="?")
    return p


def body(argv):
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.tar and args.upload:
        raise UsageError("-t and --upload cannot be used together (as in overlaybd: the tar "
                         "wrapper cannot be streamed)")
    if args.upload and args.seal:
        raise UsageError("--upload does nothing with --seal (there is no output to upload)")
    if not args.zfile and (args.algorithm or args.bs):
        print("warning: --algorithm/--bs have no effect without -z", file=sys.stderr)
    algo = algorithm(args.algorithm or "lz4")
    bs = block_size(args.bs or 4)
    if args.compress_threads < 1:
        raise UsageError(f"--compress_threads {args.compress_threads}: must be at least 1")
    if len(args.message.encode()) > lsmt.TAG_SIZE:
        raise UsageError(f"-m: commit message is {len(args.message.encode())} bytes, at most {lsmt.TAG_SIZE}")

    if args.seal:
        layer = RWLayer.open(args.data_file, args.index_file)
        try:
            layer.seal()
        finally:
            layer.close()
        return 0

    if args.commit_sealed:
        out_path = args.index_file
        if not out_path:
            raise UsageError("--commit_sealed needs: sealed_file commit_file")
        fd = os.open(args.data_file, os.O_RDONLY)
        try:
            backing, _, _, _ = unwrap(fd, args.data_file)
            _, _, index = lsmt.load_ro(backing, args.data_file)
            return _write(args, [backing], index.records(), out_path, algo, bs)
        finally:
            os.close(fd)

    if not args.index_file or not args.commit_file:
        raise UsageError("usage: overlaybd-commit data_file index_file commit_file")
    if args.turbo:
        return _turbo(args, algo, bs)
    layer = RWLayer.open(args.data_file, args.index_file)
    try:
        return _write(args, [layer.backing], layer.index.records(), args.commit_file, algo, bs)
    finally:
        layer.close()


def _write(args, files, records, out_path, algo, bs):
    header = commit.layer_info(files, args.uuid, args.parent_uuid, args.message)
    upload = start_upload(args, "overlaybd-commit", args.zfile)
    write_output(out_path, lambda out: commit.compact(records, files, out, header), upload,
                 force=args.force, use_zfile=args.zfile, use_tar=args.tar, algo=algo, bs=bs,
                 threads=args.compress_threads, overwrite_header=args.zfile)
    return 0


def _turbo(args, algo, bs):
    """LSMTWarpFile::commit: tag-0 data copied from fsmeta and re-mapped,
    tag-1 (tar) records copied verbatim (docs/formats.md, Writable warp layer)."""
    from tcmu_obd.image.warp_rw import TAG_REMOTE, WarpRWLayer
    if args.seal or args.commit_sealed:
        raise UsageError("--turboOCI cannot be used with --seal or --commit_sealed")
    layer = WarpRWLayer.open(args.data_file, args.index_file)
    try:
        h = layer.header
        uid = args.uuid.upper() if args.uuid and lsmt.valid_uuid(args.uuid) else lsmt.NULL_UUID
        parent = args.parent_uuid.upper() if args.parent_uuid and lsmt.valid_uuid(args.parent_uuid) \
            else h.parent_uuid
        header = lsmt.LsmtHeader(lsmt.FLAG_HEADER | lsmt.FLAG_DATA | lsmt.FLAG_SEALED, 0, 0,
                                 layer.vsize, uid, parent, args.message.encode())
        upload = start_upload(args, "overlaybd-commit", args.zfile)
        write_output(args.commit_file,
                     lambda out: commit.compact(layer.records(), [layer.backing], out, header,
                                                remote_tag=TAG_REMOTE),
                     upload, force=args.force, use_zfile=args.zfile, use_tar=args.tar, algo=algo, bs=bs,
                     threads=args.compress_threads, overwrite_header=args.zfile)
        return 0
    finally:
        layer.close()


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
