"""The `tcmu-obd install` and `tcmu-obd uninstall` subcommands: argument
parsing only; what gets written and removed is tcmu_obd.build.install's."""
from tcmu_obd.build import install


def cmd_install(args):
    install.install(args.root, force=args.force)
    return 0


def cmd_uninstall(args):
    install.uninstall(args.root)
    return 0


def add_subcommands(sub, common):
    s = sub.add_parser("install", parents=[common],
                       help="lay out overlaybd's files (/opt/overlaybd/bin tools, base layer, "
                            "overlaybd.json if absent, overlaybd-tcmu.service) running tcmu-obd")
    s.add_argument("--root", default="/", metavar="DIR", help="install under DIR (default /)")
    s.add_argument("--force", action="store_true",
                   help="move a foreign overlaybd installation's files aside (<file>.pre-tcmu-obd)")
    s.set_defaults(fn=cmd_install)
    s = sub.add_parser("uninstall", parents=[common],
                       help="remove what `tcmu-obd install` wrote and nobody changed since")
    s.add_argument("--root", default="/", metavar="DIR", help="the DIR given to install")
    s.set_defaults(fn=cmd_uninstall)
