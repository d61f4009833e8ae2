"""overlaybd-merge: flatten the image of a config.v1.json into one committed
layer (a ZFile by default), keeping overlaybd's layer precedence."""
import argparse
import sys

from .. import commit, config
from ..errors import UnsupportedError, UsageError
from .common import Output, run, setup_logging


def _bool(text):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def parser():
    p = argparse.ArgumentParser(prog="overlaybd-merge", description="Merge an image's layers into one.")
    p.add_argument("--service_config_path", default="/etc/overlaybd/overlaybd.json")
    p.add_argument("--compress", type=_bool, nargs="?", const=True, default=True,
                   help="ZFile output (default true; --compress false for plain LSMT)")
    p.add_argument("-t", "--tar", action="store_true", help="only with --upload, as in overlaybd")
    p.add_argument("--upload", default="")
    p.add_argument("--upload_bs", type=int, default=0)
    p.add_argument("--cred_file_path", default="")
    p.add_argument("--tls_key_path", default="")
    p.add_argument("--tls_cert_path", default="")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("image_config")
    p.add_argument("output")
    return p


def body(argv):
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.upload:
        raise UnsupportedError("--upload: uploading to a registry is not yet supported")
    image = config.open_image(args.image_config)
    try:
        files = image.files()
        if not files:
            raise UsageError(f"{args.image_config}: the image has no layers to merge")
        records = image.effective_records()
        header = commit.layer_info(files)
        if header.virtual_size == 0:
            # overlaybd copies the top layer's header vsize even when it is 0
            # (a layer committed from an RW layer that inherited its size);
            # the stack's own size is what a user of the merged layer expects
            header.virtual_size = image.virtual_size
        out = Output(args.output, force=True, use_zfile=args.compress)
        try:
            commit.compact(records, files, out, header)
            out.close()
        finally:
            out.abort()
    finally:
        image.close()
    return 0


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))
