"""`tcmu-obd convert SRC DST` builds an overlaybd image from an OCI/Docker
image in a registry (tcmu_obd.build.convert); `tcmu-obd run REF` mounts an
overlaybd image from a registry read-only, fetching only what is read.

Registries on localhost/127.0.0.1/::1 are spoken to over plain HTTP, others
over HTTPS (--plain-http forces HTTP).  Credentials: --cred-file (a
cred.json), else the global config's credentials, else docker's
config.json.  Progress (bars on a terminal, one line per finished step
otherwise) and the summary table go to stderr."""
import argparse
import os
import signal
import stat
import sys
import threading

from tcmu_obd.build import convert, progress, run, untar
from tcmu_obd.remote import imageref
from tcmu_obd import service_config
from tcmu_obd.errors import UsageError
from tcmu_obd.cli.common import subcommand_main

GiB = 1 << 30


def _size(text):
    """--vsize: GiB as an integer, or a number with a K/M/G suffix."""
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t) * GiB
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GiB (64) or a size like 512M") from None


def cmd_convert(args):
    svc = service_config.load_given(args.service_config)
    opts = convert.Options(
        mkfs=args.mkfs, vsize_bytes=args.vsize, algorithm=args.algorithm, bs_kb=args.bs,
        oci=args.oci, plain_http=args.plain_http, platform=tuple(imageref.parse_platform(args.platform)),
        db_path="none" if args.no_reuse else args.db, workdir=args.workdir, keep=args.keep,
        service_config=svc, cred_file=args.cred_file, compress_threads=args.compress_threads,
        quiet=args.quiet, progress=args.progress, turbo=args.turbo, fstype=args.fstype)
    if opts.turbo:
        from tcmu_obd.build import convert_turbo
        summary = convert_turbo.convert(args.src, args.dst, opts)
    else:
        summary = convert.convert(args.src, args.dst, opts)
    if args.dump_manifest:
        sys.stdout.write(summary.manifest.decode() + "\n")
    else:
        print(f"{summary.dst}@{summary.manifest_digest}")
    return 0


def _walk(root, out):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            out.write(_line(rel, st, p) + "\n")


def _line(rel, st, path):
    kind = stat.filemode(st.st_mode)
    extra = f" -> {os.readlink(path)}" if stat.S_ISLNK(st.st_mode) else ""
    return f"{kind} {st.st_uid:>5}:{st.st_gid:<5} {st.st_size:>10}  {rel}{extra}"


def cmd_run(args):
    svc = service_config.load_given(args.service_config)
    if args.mount and not os.path.isdir(args.mount):
        raise UsageError(f"--mount {args.mount}: not a directory")
    img = run.RunningImage(args.ref, args.mount, args.plain_http,
                           imageref.parse_platform(args.platform), svc, args.cred_file,
                           args.cache_dir, args.frontend)
    stop = threading.Event()
    got = {}

    def on_signal(signum, _frame):
        got["sig"] = signal.Signals(signum).name
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    def fetched_line():
        f = img.fetched()
        if f is None:
            return (f"bytes fetched are not counted: {img.device.served_by} serves the image "
                    f"({img.image_size} bytes in {len(img.lowers)} layer blobs)")
        pct = 100.0 * f / img.image_size if img.image_size else 0.0
        return (f"fetched {f} bytes of {img.image_size} ({pct:.2f} % of the image's "
                f"{len(img.lowers)} layer blobs) in {img.counter.reads} registry reads")

    with img:
        print(f"run: {img.where}: mounted read-only at {img.mountpoint} ({img.dev} through "
              f"{img.device.frontend}, {img.virtual_size / GiB:.1f} GiB virtual disk)", file=sys.stderr)
        print(f"run: {fetched_line()}", file=sys.stderr, flush=True)
        if args.exit:
            out = sys.stdout
            if args.tree:
                _walk(img.mountpoint, out)
            else:
                for name in sorted(os.listdir(img.mountpoint)):
                    p = os.path.join(img.mountpoint, name)
                    out.write(_line(name, os.lstat(p), p) + "\n")
            for path in args.cat or []:
                real = untar.resolve_in_root(img.mountpoint, path)
                with open(real, "rb") as f:
                    out.flush()
                    out.buffer.write(f.read())
            out.flush()
            print(f"run: after reading: {fetched_line()}", file=sys.stderr, flush=True)
        else:
            print("run: serving until Ctrl-C / SIGTERM", file=sys.stderr, flush=True)
            print(img.mountpoint, flush=True)
            while not stop.wait(0.5):
                pass
            print(f"run: {got.get('sig', 'stop')}: unmounting; {fetched_line()}", file=sys.stderr)
    return 0


def add_subcommands(sub, common):
    """Register `convert` and `run` on an argparse subparsers object."""
    s = sub.add_parser("convert", parents=[common],
                       help="convert an OCI/Docker image into an overlaybd image (registry to registry)")
    s.add_argument("src", metavar="SRC_REF", help="HOST[:PORT]/REPO[:TAG|@DIGEST] of the source image")
    s.add_argument("dst", metavar="DST_REF", help="HOST[:PORT]/REPO[:TAG] to push the overlaybd image to")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--mkfs", action="store_true",
                   help="make ext4 on layer 0 (no base layer in the image)")
    g.add_argument("--base-layer", dest="mkfs", action="store_false",
                   help="stack on the bundled 64 GiB base layer, prepended as layer 0 (default)")
    s.set_defaults(mkfs=False)
    s.add_argument("--vsize", type=_size, default=64 * GiB,
                   help="virtual disk size with --mkfs: GiB, or a size like 512M (default 64)")
    s.add_argument("--algorithm", default="lz4", choices=("lz4", "zstd"), help="ZFile codec (default lz4)")
    s.add_argument("--bs", type=int, default=4, help="ZFile block size in KiB: 4..64 (default 4)")
    s.add_argument("--oci", action="store_true", help="OCI media types instead of Docker schema2")
    s.add_argument("--turboOCI", dest="turbo", action="store_true",
                   help="TurboOCI: keep the original layers, add a meta blob per layer (no layer reuse)")
    s.add_argument("--fstype", default="ext4", choices=("ext4", "erofs"),
                   help="with --turboOCI: the meta layers' file system (default ext4)")
    s.add_argument("--plain-http", action="store_true", help="HTTP for every registry")
    s.add_argument("--platform", default="linux/amd64", help="OS/ARCH[/VARIANT] from an index")
    s.add_argument("--db", default="", metavar="PATH",
                   help=f"layer database for reuse (default {convert.default_db_path()})")
    s.add_argument("--no-reuse", action="store_true", help="convert every layer, use no database")
    s.add_argument("--workdir", default="", metavar="DIR", help="where the temporary files go")
    s.add_argument("--keep", action="store_true", help="keep the work directory")
    s.add_argument("--compress-threads", type=int, default=1, help="ZFile compression threads")
    s.add_argument("--cred-file", "--cred_file_path", dest="cred_file", default="",
                   help="cred.json to use instead of the global config's credentials")
    s.add_argument("--dump-manifest", action="store_true", help="print the pushed manifest on stdout")
    s.add_argument("--quiet", "-q", action="store_true", help="nothing on stderr but errors")
    s.add_argument("--progress", default="auto", choices=progress.MODES,
                   help="bars: redrawn in place; lines: one line per finished step (for logs); "
                        "none: only the per-layer lines and the summary; auto (default): bars "
                        "when stderr is a terminal, else lines")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("run", parents=[common],
                       help="mount an overlaybd image from a registry read-only (lazily fetched)")
    s.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    s.add_argument("--mount", default="", metavar="DIR", help="mount point (default: a temporary directory)")
    s.add_argument("--exit", action="store_true",
                   help="list the root (or --tree), print what was fetched, unmount and exit")
    s.add_argument("--tree", action="store_true", help="with --exit: list every file")
    s.add_argument("--cat", action="append", metavar="PATH", help="with --exit: print a file")
    s.add_argument("--plain-http", action="store_true", help="HTTP for every registry")
    s.add_argument("--platform", default="linux/amd64", help="OS/ARCH[/VARIANT] from an index")
    s.add_argument("--cache-dir", default="", metavar="DIR",
                   help="blob cache (default: a temporary one, so the fetched figure is this run's)")
    s.add_argument("--cred-file", "--cred_file_path", dest="cred_file", default="",
                   help="cred.json to use instead of the global config's credentials")
    s.add_argument("--frontend", choices=("auto", "tcmu", "fuse"), default=None,
                   help="block device: TCMU where the kernel has it, else FUSE + loop "
                        "(default auto, or $TCMU_OBD_FRONTEND)")
    s.set_defaults(fn=cmd_run)


def main(argv=None):
    subcommand_main("tcmu-obd", "overlaybd image conversion and run.", add_subcommands, argv)


if __name__ == "__main__":
    main()
