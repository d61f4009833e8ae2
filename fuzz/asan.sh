#!/usr/bin/env bash
# Run fuzz harnesses against an AddressSanitizer build of the native core.
#
#   bash fuzz/asan.sh                          # every harness, 10 s each, over a copy of its corpus
#   FUZZ_SECONDS=60 bash fuzz/asan.sh fuzz/fuzz_zfile.py [more harnesses]
#
# Builds tcmu_obd's extensions with -fsanitize=address (setup.py, TCMU_OBD_ASAN=1)
# into build/asan/lib, never over the in-place .so files, and makes
# build/asan/root: symlinks to the repository's Python sources and fuzz
# harnesses next to the ASan .so files, so a harness started from there (it
# puts its parent directory first on sys.path) imports the ASan core.
# atheris's ASan+libFuzzer runtime is preloaded (the extensions do not link
# one); leaks are not checked (CPython's own allocations would drown them).
# Each harness gets a temporary copy of fuzz/corpus/<harness>/ as its corpus,
# so nothing is written into the repository.  Not the normal fuzz run:
# scripts/test.sh runs the harnesses against the normal build.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
OUT=${ASAN_DIR:-$REPO/build/asan}
SECONDS_EACH=${FUZZ_SECONDS:-10}

echo "== asan: building the core into $OUT/lib"
TCMU_OBD_ASAN=1 "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp" 2>&1 \
    | grep -v "^warning\|^$" | tail -n 5 || true
ls "$OUT"/lib/tcmu_obd/core/_lsmt.*.so >/dev/null

rm -rf "$OUT/root"
mkdir -p "$OUT/root/fuzz"
cp -rs "$REPO/tcmu_obd" "$OUT/root/tcmu_obd"       # real directories, files as symlinks
find "$OUT/root/tcmu_obd" -name __pycache__ -prune -exec rm -rf {} +
find "$OUT/root/tcmu_obd" \( -name '*.so' -o -name '*.c' \) -delete
(cd "$OUT/lib" && find tcmu_obd -name '*.so' -exec cp {} "$OUT/root/{}" \;)
for f in "$REPO"/fuzz/*.py; do ln -s "$f" "$OUT/root/fuzz/"; done

RUNTIME="$("$PY" -c 'import atheris; print(atheris.path())')/asan_with_fuzzer.so"
[ -f "$RUNTIME" ] || { echo "asan: $RUNTIME not found (pip install atheris)" >&2; exit 2; }
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}

harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(fuzz/fuzz_*.py)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for h in "${harnesses[@]}"; do
    name=$(basename "$h" .py)
    mkdir -p "$work/$name"
    if [ -d "fuzz/corpus/$name" ]; then cp -r "fuzz/corpus/$name/." "$work/$name/"; fi
    echo "== asan fuzz: $name (${SECONDS_EACH}s, $(ls "$work/$name" | wc -l) seeds)"
    # the import check proves the harness got the ASan core, not the in-place one
    if ! (cd "$work" && LD_PRELOAD="$RUNTIME" "$PY" -c "import sys; sys.path.insert(0, '$OUT/root'); \
from tcmu_obd.core import _lsmt; assert _lsmt.__file__.startswith('$OUT/root'), _lsmt.__file__"); then
        echo "asan: the ASan core does not import" >&2; exit 2
    fi
    if ! (cd "$work" && LD_PRELOAD="$RUNTIME" "$PY" "$OUT/root/fuzz/$name.py" "$work/$name" \
            -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 2>&1 | tail -n 4; exit "${PIPESTATUS[0]}"); then
        echo "asan: $name FAILED (its output above; crash files in $work are removed at exit:" \
             "rerun by hand to keep them)" >&2
        status=1
    fi
done
exit $status
