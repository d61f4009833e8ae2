#!/usr/bin/env bash
# The main job on a built-in default image, end to end (scripts/demo_e2e.sh):
# set up, start a local registry, build a small multi-layer OCI image, convert
# and push it as overlaybd, run it lazily and show the bytes fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/demo_e2e.sh "$@"
