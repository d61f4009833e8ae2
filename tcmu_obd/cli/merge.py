"""overlaybd-merge: flatten the image of a config.v1.json into one committed
layer (a ZFile by default), keeping overlaybd's layer precedence; with
--upload, also stream the ZFile to a registry as a blob.

-t: overlaybd-merge means to tar-wrap the output only when uploading, but
its code wraps the output handle before that handle is opened (a null
file), so -t never has any effect there.  tcmu-obd does what the code was
meant to do: with --upload and -t, the local output is tar-wrapped; the
upload tees the ZFile below the wrapper (overlaybd's chain is ZFile ->
uploader -> tar -> file), so the blob is the bare ZFile.  Without --upload,
-t is ignored with a warning, as in overlaybd."""
import argparse
import sys

from tcmu_obd.image import assemble, commit
from tcmu_obd import service_config
from tcmu_obd.errors import UsageError
from tcmu_obd.cli.common import add_upload_args, run, setup_logging, start_upload, write_output


def _bool(text):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def parser():
    p = argparse.ArgumentParser(prog="overlaybd-merge", description="Merge an image's layers into one.")
    p.add_argument("--service_config_path", "--service-config", default=None,
                   help="global overlaybd.json; a path given must exist (default: "
                        f"{service_config.DEFAULT_PATH} when present, else built-in defaults)")
    p.add_argument("--compress", type=_bool, nargs="?", const=True, default=True,
                   help="ZFile output (default true; --compress false for plain LSMT)")
    p.add_argument("-t", "--tar", action="store_true",
                   help="tar-wrap the local output; only with --upload, as overlaybd intends")
    add_upload_args(p)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("image_config")
    p.add_argument("output")
    return p


def body(argv):
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.tar and not args.upload:
        print("warning: -t has no effect without --upload (as in overlaybd)", file=sys.stderr)
    image = assemble.open_image(args.image_config, service_config.load_given(args.service_config_path))
    try:
        files = image.files()
        if not files:
            raise UsageError(f"{args.image_config}: the image has no layers to merge")
        records = image.effective_records()
        header = commit.layer_info([f for f in files if not f.zero_fill_past_end])   # no TurboOCI targets
        if header.virtual_size == 0:
            # overlaybd copies the top layer's header vsize even when it is 0
            # (a layer committed from an RW layer that inherited its size);
            # the stack's own size is what a user of the merged layer expects
            header.virtual_size = image.virtual_size
        upload = start_upload(args, "overlaybd-merge", args.compress)
        write_output(args.output, lambda out: commit.compact(records, files, out, header), upload,
                     force=True, use_zfile=args.compress, use_tar=bool(args.tar and upload))
    finally:
        image.close()
    return 0


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
