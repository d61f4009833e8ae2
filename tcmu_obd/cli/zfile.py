"""overlaybd-zfile: compress a file into a ZFile, extract one (-x), or check
every block's CRC (--verify); -t puts the tar wrapper on the output (compress)
or expects it on the input (extract/verify)."""
import argparse
import os
import sys

from tcmu_obd.format import tar, zfile
from tcmu_obd.errors import FormatError, UsageError
from tcmu_obd.image.output import Output
from tcmu_obd.cli.common import algorithm, block_size, run, setup_logging

CHUNK = 4 << 20


def parser():
    p = argparse.ArgumentParser(prog="overlaybd-zfile", description="Create, extract or verify a ZFile.")
    p.add_argument("-t", "--tar", action="store_true")
    p.add_argument("-x", "--extract", action="store_true")
    p.add_argument("--verify", action="store_true")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("--algorithm", default="lz4")
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("source_file")
    p.add_argument("target_file", nargs="?")
    return p


def _open_zfile(path, expect_tar):
    """A ZFileBacking over a (maybe tar-wrapped) file; (fd, backing, info)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        base = 0
        found = tar.detect(lambda o, n: os.pread(fd, n, o), size, path)
        if found is not None:
            base, size = found
        elif expect_tar:
            raise FormatError(path, "tar header", os.pread(fd, 8, 257), "-t given but the file is not a tar")
        if not zfile.is_zfile(os.pread(fd, zfile.HT_SIZE, base), path):
            raise FormatError(path, "zfile magic", os.pread(fd, 24, base), "not a ZFile")
        backing, info = zfile.open_backing(fd, base, size, path)
        return fd, backing, info
    except BaseException:
        os.close(fd)
        raise


def body(argv):
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.verify:
        fd, backing, info = _open_zfile(args.source_file, False)
        try:
            if not info.verify:
                raise FormatError(args.source_file, "verify", info.verify, "the ZFile has no block CRCs")
            backing.verify_all()
        finally:
            os.close(fd)
        print(f"{args.source_file} is a valid zfile blob.")
        return 0
    if args.extract:
        if not args.target_file:
            raise UsageError("-x needs source_file and target_file (stdin is not allowed)")
        fd, backing, _ = _open_zfile(args.source_file, args.tar)
        try:
            out = Output(args.target_file, args.force, mode=0o700)
            try:
                for off in range(0, backing.size, CHUNK):
                    out.write(backing.pread(off, CHUNK))
                out.close()
            finally:
                out.abort()
        finally:
            os.close(fd)
        return 0
    algo = algorithm(args.algorithm)
    bs = block_size(args.bs)
    if args.target_file:
        src, dst = open(args.source_file, "rb"), args.target_file
    else:
        src, dst = sys.stdin.buffer, args.source_file
    try:
        out = Output(dst, args.force, use_zfile=True, use_tar=args.tar, algo=algo, bs=bs)
        try:
            while True:
                data = src.read(CHUNK)
                if not data:
                    break
                out.write(data)
            out.close()
        finally:
            out.abort()
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    return 0


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
