#!/usr/bin/env bash
# Builds the real container client the end-to-end suite (tests/e2e) drives
# tcmu-obd with: containerd 2 (containerd, its plain ctr, containerd-shim-runc-v2)
# and accelerated-container-image's overlaybd-snapshotter, its ctr (rpull,
# record-trace), convertor and overlaybd-attacher, from their published Go
# modules at pinned versions.  The binaries go into a cache directory named after
# the versions, which a second run reuses without touching the network.  runc is
# not built here: it is Debian's `runc` package.  It is not a packaging script and
# installs nothing outside the cache directory.
#
#   scripts/build-e2e.sh            # prints the cache dir (last line of stdout)
#   TCMU_OBD_E2E_CACHE=/some/dir scripts/build-e2e.sh
#
# Versions: accelerated-container-image v1.4.5 requires containerd/v2 v2.3.5 in
# its go.mod, so containerd is pinned to that same v2.3.5: the snapshotter is then
# run against the containerd it was built and tested with, and both builds share
# one module download and most of Go's build cache.
set -euo pipefail

ACI_VERSION=${TCMU_OBD_E2E_ACI_VERSION:-v1.4.5}
CONTAINERD_VERSION=${TCMU_OBD_E2E_CONTAINERD_VERSION:-v2.3.5}
BASE=${TCMU_OBD_E2E_CACHE:-/var/cache/tcmu-obd-e2e}
DIR="$BASE/aci-$ACI_VERSION-containerd-$CONTAINERD_VERSION"

ACI_BINS=(overlaybd-snapshotter ctr convertor overlaybd-attacher)
CTRD_BINS=(containerd ctr containerd-shim-runc-v2)

complete() {
    local b
    for b in "${ACI_BINS[@]}"; do [ -x "$DIR/aci/$b" ] || return 1; done
    for b in "${CTRD_BINS[@]}"; do [ -x "$DIR/containerd/$b" ] || return 1; done
    [ -f "$DIR/done" ]
}

if complete; then
    echo "build-e2e: cached in $DIR" >&2
    echo "$DIR"
    exit 0
fi

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    export PATH="$PATH:/usr/local/go/bin"      # the official tarball's place, often not on PATH
fi
if ! command -v go >/dev/null 2>&1; then
    echo "build-e2e: 'go' is not on PATH: install Go >= 1.26 (accelerated-container-image $ACI_VERSION's go.mod asks for go 1.26.3)" >&2
    exit 1
fi

mkdir -p "$DIR/aci" "$DIR/containerd"
# Two binaries are named ctr (aci's has rpull, containerd's is plain), hence two GOBINs.
export GOFLAGS=-buildvcs=false CGO_ENABLED=${CGO_ENABLED:-1}
start=$(date +%s)

aci=()
for b in "${ACI_BINS[@]}"; do aci+=("github.com/containerd/accelerated-container-image/cmd/$b@$ACI_VERSION"); done
echo "build-e2e: go install ${aci[*]}" >&2
GOBIN="$DIR/aci" nice go install "${aci[@]}" >&2
t_aci=$(date +%s)

ctrd=()
for b in "${CTRD_BINS[@]}"; do ctrd+=("github.com/containerd/containerd/v2/cmd/$b@$CONTAINERD_VERSION"); done
echo "build-e2e: go install ${ctrd[*]}" >&2
GOBIN="$DIR/containerd" nice go install "${ctrd[@]}" >&2
end=$(date +%s)

{
    echo "aci $ACI_VERSION containerd $CONTAINERD_VERSION $(go version)"
    echo "built $(date -u +%FT%TZ): aci $((t_aci - start)) s, containerd $((end - t_aci)) s, total $((end - start)) s"
} > "$DIR/done"
echo "build-e2e: built in $((end - start)) s (aci $((t_aci - start)) s, containerd $((end - t_aci)) s) into $DIR" >&2
echo "$DIR"
