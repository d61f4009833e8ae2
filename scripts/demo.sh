#!/usr/bin/env bash
# The main job on the built-in default image: set up, then open the bundled
# overlaybd base layer and show what is in it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m tcmu_obd.cli.main demo "$@"
