"""`tcmu-obd serve|attach|detach|list|doctor` and `overlaybd-tcmu`.

add_subcommands(sub, common) registers the five subcommands on the
`tcmu-obd` parser (cli/main.py); main() is a stand-alone parser with the
same subcommands (`python -m tcmu_obd.cli.serve serve ...`), and
main_overlaybd_tcmu() is overlaybd's daemon command line
(`overlaybd-tcmu [/etc/overlaybd/overlaybd.json]`)."""
import argparse
import json
import sys

from tcmu_obd.serve import attach as attach_mod
from tcmu_obd.serve import doctor, iscsi
from tcmu_obd import service_config
from tcmu_obd.errors import UsageError
from tcmu_obd.cli.common import run


def cmd_serve(args):
    from tcmu_obd.serve import daemon
    if args.config and args.service_config and args.config != args.service_config:
        raise UsageError(f"two global configs given: {args.config} and --service-config "
                         f"{args.service_config}")
    return daemon.serve(args.config or args.service_config,
                        workers=args.workers, dbus=args.dbus, pid_file=args.pid_file,
                        log_stderr=args.log_stderr, verbose=args.verbose,
                        write_cache=args.write_cache)


def cmd_attach(args):
    dev = attach_mod.attach(args.config, args.dev_id, args.iscsi, wait=args.wait,
                            enable_timeout=args.enable_timeout,
                            check_daemon=not args.no_daemon_check, iscsi_port=args.iscsi_port)
    print(dev)
    return 0


def cmd_detach(args):
    dev_id = attach_mod.detach(args.target, force=args.force)
    print(f"detached dev id {dev_id}", file=sys.stderr)
    return 0


def cmd_list(args):
    devs = attach_mod.list_devices()
    if args.json:
        print(json.dumps(devs, indent=2))
        return 0
    if not devs:
        print("no overlaybd devices", file=sys.stderr)
        return 0
    print(f"{'DEV_ID':>13}  {'DISK':10} {'STATE':8} {'FABRIC':8} CONFIG")
    for d in devs:
        fabric = d.get("fabric") or "-"
        if fabric == "iscsi" and d.get("portal"):
            fabric = f"iscsi {d['portal']} {d['target']}"
        print(f"{d['dev_id'] or d['name']:>13}  {d['disk'] or '-':10} "
              f"{'enabled' if d['enabled'] else 'disabled':8} {fabric:8} {d['config']}")
    return 0


def cmd_doctor(args):
    problems = 0
    checks = doctor.doctor_checks()
    if args.iscsi:
        checks += iscsi.checks()
    for ok, what, fix in checks:
        print(f"[{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            problems += 1
            print(f"       fix: {fix}")
    print(f"{problems} problem{'s' if problems != 1 else ''} found" if problems else "all checks passed")
    return 1 if problems else 0


def add_subcommands(sub, common):
    """Register serve, attach, detach, list and doctor on a subparsers object;
    `common` is the parent parser with --verbose / --service-config."""
    s = sub.add_parser("serve", parents=[common],
                       help="run the TCMU daemon for `overlaybd/<config>` backstores (overlaybd-tcmu)")
    s.add_argument("config", nargs="?", default=None, metavar="overlaybd.json",
                   help=f"global config (default {service_config.DEFAULT_PATH})")
    s.add_argument("--workers", type=int, default=8, help="I/O worker threads (default 8)")
    s.add_argument("--dbus", choices=("auto", "yes", "no"), default="auto",
                   help="register the handler on the system D-Bus (auto: when a bus is there)")
    s.add_argument("--pid-file", default="/run/tcmu-obd/serve.pid", help="written once ready")
    s.add_argument("--log-stderr", action="store_true", help="log to stderr too")
    wc = s.add_mutually_exclusive_group()
    wc.add_argument("--write-cache", dest="write_cache", action="store_const", const=True, default=None,
                    help="report WCE=1: writes are acknowledged before they are durable and made "
                         "durable when the initiator flushes (default: tcmuObd.writeCache, false)")
    wc.add_argument("--no-write-cache", dest="write_cache", action="store_const", const=False,
                    help="report WCE=0, as overlaybd does: each write is durable before it is "
                         "acknowledged (the default)")
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("attach", parents=[common],
                       help="attach a config.v1.json as /dev/sdX through configfs "
                            "(tcm_loop, or iSCSI on 127.0.0.1 with --iscsi)")
    s.add_argument("config", metavar="CONFIG.json")
    s.add_argument("--dev-id", default=None, help="device id (digits); also appended to the "
                   "cfgstring as `;<id>` (default: the lowest free id, not appended)")
    s.add_argument("--iscsi", action="store_true",
                   help="export as an iSCSI target on 127.0.0.1 and log in with open-iscsi "
                        "(needs iscsi_target_mod, iscsiadm, a running iscsid and lo up; "
                        "see `tcmu-obd doctor --iscsi`)")
    s.add_argument("--iscsi-port", type=int, default=None,
                   help="iSCSI portal port (default: the first free one from 3260)")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for /dev/sdX")
    s.add_argument("--enable-timeout", type=float, default=120.0,
                   help="seconds to wait for the daemon to open the image")
    s.add_argument("--no-daemon-check", action="store_true",
                   help="do not refuse when no daemon process is found")
    s.set_defaults(fn=cmd_attach)
    s = sub.add_parser("detach", parents=[common], help="detach a device (reverse order of attach; "
                       "an iSCSI device is logged out first)")
    s.add_argument("target", metavar="ID|/dev/sdX")
    s.add_argument("--force", action="store_true", help="detach even if mounted")
    s.set_defaults(fn=cmd_detach)
    s = sub.add_parser("list", parents=[common], help="attached overlaybd devices")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_list)
    s = sub.add_parser("doctor", parents=[common],
                       help="check modules, configfs, libtcmu, permissions and the daemon")
    s.add_argument("--iscsi", action="store_true",
                   help="also check what `attach --iscsi` needs (iscsi_target_mod, open-iscsi, lo)")
    s.set_defaults(fn=cmd_doctor)


def parser():
    p = argparse.ArgumentParser(prog="tcmu-obd", description="overlaybd TCMU daemon and devices.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true")
    common.add_argument("--service-config", "--service_config_path", dest="service_config",
                        default=None, help="global overlaybd.json")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_subcommands(sub, common)
    return p


def body(argv):
    args = parser().parse_args(argv)
    return args.fn(args)


def main(argv=None):
    sys.exit(run(body, sys.argv[1:] if argv is None else argv))


def main_overlaybd_tcmu(argv=None):
    """overlaybd-tcmu [overlaybd.json]"""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="overlaybd-tcmu",
                                description="overlaybd TCMU daemon (tcmu-obd implementation)")
    p.add_argument("config", nargs="?", default=None,
                   help=f"a path given must exist (default: {service_config.DEFAULT_PATH} "
                        "when present, else built-in defaults)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    from tcmu_obd.serve import daemon
    sys.exit(daemon.serve(args.config, verbose=args.verbose))


if __name__ == "__main__":
    main()
