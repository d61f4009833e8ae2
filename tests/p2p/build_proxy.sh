#!/bin/bash
# Builds the P2P proxy made for overlaybd (dadi-p2proxy, a Go program) into a
# cache directory a second run reuses, for a test against a real proxy.  It is
# not part of the default test run: on this project's machines the Go module
# proxy does not serve the module (see docs/runtime.md, P2P), so this script
# ends with the go command's own error and exit status 1.
#   usage: tests/p2p/build_proxy.sh [BIN_DIR]   (default /var/cache/tcmu-obd/go-bin)
set -euo pipefail
bin_dir=${1:-/var/cache/tcmu-obd/go-bin}
module=${DADI_P2PROXY_MODULE:-github.com/data-accelerator/dadi-p2proxy}
version=${DADI_P2PROXY_VERSION:-latest}
if [ -x "$bin_dir/p2p" ]; then
    echo "$bin_dir/p2p"
    exit 0
fi
command -v go >/dev/null || { echo "build_proxy.sh: go is not installed" >&2; exit 1; }
mkdir -p "$bin_dir"
# the upstream Makefile builds ./cmd/p2p into a binary named p2p
if ! out=$(GOBIN="$bin_dir" go install "$module/cmd/p2p@$version" 2>&1); then
    echo "build_proxy.sh: go install $module/cmd/p2p@$version failed:" >&2
    echo "$out" >&2
    exit 1
fi
echo "$bin_dir/p2p"
