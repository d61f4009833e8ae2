#!/usr/bin/env bash
# Installs what tcmu-obd needs on a fresh Debian machine (as root) and builds
# the Cython core in place.  Safe to run again; it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
for pkg in e2fsprogs erofs-utils gcc systemd docker-registry apache2-utils fuse3 libfuse3-3 libtcmu2 qemu-system-x86 busybox-static kmod tcmu-runner sg3-utils targetcli-fb dbus open-iscsi fio prometheus runc; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

"$PY" -m pip install -q --disable-pip-version-check \
    "cython>=3.0" cffi zstandard lz4 requests pytest hypothesis atheris crc32c wheel build "setuptools>=64" PyJWT cryptography mfusepy prometheus_client \
    2>&1 | grep -v -e "Location" -e "Running pip as the 'root'" || true
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e . \
    2>&1 | grep -v -e "Location" -e "Running pip as the 'root'" || true
"$PY" -c "import tcmu_obd.core._lsmt" || { echo "setup: the Cython core did not build" >&2; exit 1; }
