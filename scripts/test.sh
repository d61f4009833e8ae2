#!/usr/bin/env bash
# The test command: set up, run each fuzz harness briefly (seeded from a
# temporary copy of fuzz/corpus/<harness>/, so the repository's corpus is
# only read), the same over an AddressSanitizer build of the core
# (fuzz/asan.sh; FUZZ_ASAN=0 skips it), then the test suite, including the
# end-to-end suite (tests/e2e: containerd 2 and accelerated-container-image's
# snapshotter, built from the Go module proxy on first use, about 13 minutes,
# then cached; TCMU_OBD_E2E=0 skips it).
set -euo pipefail
export TCMU_OBD_E2E=${TCMU_OBD_E2E:-1}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
FUZZ_SECONDS=${FUZZ_SECONDS:-15}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for h in fuzz/fuzz_*.py; do
    name=$(basename "$h" .py)
    mkdir -p "$work/$name"
    if [ -d "fuzz/corpus/$name" ]; then cp -r "fuzz/corpus/$name/." "$work/$name/"; fi
    echo "== fuzz: $h (${FUZZ_SECONDS}s, $(ls "$work/$name" | wc -l) seeds)"
    "$PY" "$h" "$work/$name" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=4096 2>&1 | tail -n 3
done
if [ "${FUZZ_ASAN:-1}" = 1 ]; then
    FUZZ_SECONDS=${FUZZ_ASAN_SECONDS:-5} PYTHON="$PY" bash fuzz/asan.sh
fi
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
