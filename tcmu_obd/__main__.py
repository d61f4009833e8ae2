"""`python -m tcmu_obd`: the tcmu-obd tool, exactly as its console script
runs it (same parser, subcommands and exit codes).  Nothing else lives here:
the overlaybd-* tools keep their own console scripts."""
import sys

from tcmu_obd.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
