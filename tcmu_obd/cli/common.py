"""What the tools share: the output chain (file -> tar -> [tee to an extra
sink] -> ZFile), the registry upload behind --upload, error reporting with a
clean exit status (SIGTERM/SIGHUP unwind like Ctrl-C), and the --verbose flag.
No format logic."""
import argparse
import logging
import os
import signal
import sys
from urllib.parse import urlsplit

from tcmu_obd.remote import distribution, registry
from tcmu_obd.format import zfile
from tcmu_obd.image.output import Output
from tcmu_obd.remote.credentials import CredentialProvider
from tcmu_obd.errors import ObdError, UsageError


def open_target(path, service_config_path=None):
    """An Image from a config.v1.json, or from one layer file.  The global
    config is loaded either way, so a bad or missing one given explicitly is
    an error even where a lone layer file does not need it."""
    from tcmu_obd import service_config
    from tcmu_obd.image import assemble
    from tcmu_obd.image.layer import open_layer
    from tcmu_obd.image.stack import Image
    svc = service_config.load_given(service_config_path)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        return assemble.open_image(path, svc)
    return Image([open_layer(path)])


def fail(msg, code=1):
    print(f"error: {msg}", file=sys.stderr)
    return code


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that every `with`
    unwinds (unmount, detach, roll the upper back) as for Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, _frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)     # the clean-up itself is not interrupted
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise Terminated(signum)


def run(main_fn, argv):
    """Run a tool body; ObdError and OSError become one line on stderr.
    SIGTERM/SIGHUP (where still at their default) and Ctrl-C unwind the
    tool cleanly and exit 128 + the signal number."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _terminate)
    try:
        return main_fn(argv) or 0
    except ObdError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return 130
    except Terminated as e:
        print(f"{os.path.basename(sys.argv[0])}: {e}: stopped, cleaned up", file=sys.stderr)
        return 128 + e.signum


def add_upload_args(p):
    """overlaybd's upload flags, shared by overlaybd-commit and overlaybd-merge."""
    p.add_argument("--upload", default="", metavar="URL",
                   help="also stream the ZFile output to this registry upload URL "
                        "(https://HOST/v2/REPO/blobs/uploads/); the digest goes to stderr")
    p.add_argument("--upload_bs", type=int, default=0, metavar="KB",
                   help="upload chunk size in KiB (default 262144)")
    p.add_argument("--cred_file_path", default="", help="cred.json for the upload")
    p.add_argument("--tls_key_path", default="", help="TLS client key for the upload")
    p.add_argument("--tls_cert_path", default="", help="TLS client certificate for the upload")


def common_parent():
    """The options every image subcommand takes: --verbose and --service-config."""
    from tcmu_obd import service_config
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true")
    common.add_argument("--service-config", "--service_config_path", dest="service_config",
                        default=None, metavar="PATH",
                        help=f"global overlaybd.json; a path given must exist (without the option: "
                             f"{service_config.DEFAULT_PATH}, or built-in defaults when that is absent)")
    return common


def subcommand_main(prog, description, add_subcommands, argv=None):
    """Run a tool made of subcommands (each sets `fn`) and exit with its status."""
    def body(argv):
        p = argparse.ArgumentParser(prog=prog, description=description)
        add_subcommands(p.add_subparsers(dest="cmd", required=True), common_parent())
        args = p.parse_args(argv)
        setup_logging(args.verbose)
        return args.fn(args)
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


def setup_logging(verbose):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def block_size(kb):
    if kb not in (4, 8, 16, 32, 64):
        raise UsageError(f"--bs {kb}: must be 4, 8, 16, 32 or 64 (KiB)")
    return kb * 1024


def algorithm(name):
    """overlaybd treats an unknown name as LZ4; we refuse it instead."""
    if name not in zfile.ALGOS:
        raise UsageError(f"--algorithm {name!r}: must be lz4 or zstd")
    return zfile.ALGOS[name]


# -- --upload (docs/runtime.md, Registry uploads) -------------------------------------------------

DEFAULT_UPLOAD_BS_KB = 262144      # overlaybd's default --upload_bs (KiB), i.e. 256 MiB chunks


def _existing(path, flag):
    if path and not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    return path


class Upload:
    """A registry blob upload fed by the output chain: write() streams
    (buffered into --upload_bs chunks), finish() commits it and prints the
    digest to stderr, abort() cancels the upload session (DELETE) so no blob
    is left.  Built from the tools' --upload, --upload_bs, --cred_file_path,
    --tls_key_path and --tls_cert_path; the POST that opens the session is
    sent here, before any output is made."""

    def __init__(self, args, prog):
        url = args.upload
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"--upload {url!r}: expected an http(s) URL "
                             f"like https://HOST/v2/REPO/blobs/uploads/")
        path = parts.path.rstrip("/")
        if not path.startswith("/v2/") or not path.endswith("/blobs/uploads") \
                or len(path) <= len("/v2//blobs/uploads"):
            raise UsageError(f"--upload {url!r}: the path must be /v2/<repo>/blobs/uploads/")
        url = parts._replace(path=path + "/").geturl()    # the route registries serve
        bs_kb = DEFAULT_UPLOAD_BS_KB if not args.upload_bs else args.upload_bs
        if bs_kb <= 0:
            raise UsageError(f"--upload_bs {args.upload_bs}: must be a positive number of KiB")
        cred = _existing(args.cred_file_path, "--cred_file_path")
        key = _existing(args.tls_key_path, "--tls_key_path")
        cert = _existing(args.tls_cert_path, "--tls_cert_path")
        if bool(key) != bool(cert):
            raise UsageError("--tls_key_path and --tls_cert_path go together")
        creds = CredentialProvider(mode="file", path=cred) if cred else CredentialProvider()
        settings = registry.RegistrySettings(cert_file=cert, key_file=key)
        self.prog = prog
        self.url = url
        self.client = registry.RegistryClient(settings, creds)
        try:
            self.uploader = distribution.BlobUploader(self.client, url, bs_kb * 1024)
        except BaseException:
            self.client.close()
            raise
        self.digest = None

    @property
    def size(self):
        return self.uploader.bytes_written

    def write(self, data):
        return self.uploader.write(data)

    def finish(self):
        """Send the rest, commit the blob; print and return its digest."""
        try:
            self.digest = self.uploader.close()
        finally:
            self.client.close()
        print(f"{self.prog}: uploaded {self.size} bytes to {self.url}, digest: {self.digest}",
              file=sys.stderr)
        return self.digest

    def abort(self):
        """Cancel the session (best effort; a no-op after finish())."""
        if self.digest is None:
            self.uploader.abort()
            self.client.close()


def start_upload(args, prog, use_zfile):
    """An Upload for args.upload, or None without --upload.  overlaybd only
    uploads ZFile output and silently ignores --upload otherwise; that is an
    error here."""
    if not args.upload:
        for flag in ("upload_bs", "cred_file_path", "tls_key_path", "tls_cert_path"):
            if getattr(args, flag):
                print(f"warning: --{flag} has no effect without --upload", file=sys.stderr)
        return None
    if not use_zfile:
        raise UsageError("--upload needs ZFile output (overlaybd streams only the ZFile to the "
                         "registry and ignores --upload without it)")
    return Upload(args, prog)


def write_output(path, produce, upload=None, **output_kw):
    """Run produce(out) into a new Output at path (and tee it to `upload`);
    on any failure remove the half-written file and cancel the upload.  The
    local file is complete before the upload is committed."""
    try:
        out = Output(path, extra=upload, **output_kw)
        try:
            produce(out)
            out.close()
        finally:
            out.abort()
        if upload is not None:
            upload.finish()
    except BaseException:
        if upload is not None:
            upload.abort()
        raise
