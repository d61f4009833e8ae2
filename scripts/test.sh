#!/usr/bin/env bash
# The test command: set up, run each fuzz harness briefly, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
FUZZ_SECONDS=${FUZZ_SECONDS:-15}
for h in fuzz/fuzz_*.py; do
    echo "== fuzz: $h (${FUZZ_SECONDS}s)"
    "$PY" "$h" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=4096 2>&1 | tail -n 3
done
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
