#!/usr/bin/env bash
# End to end, on this machine, as root: set up; start a private docker-registry on
# 127.0.0.1 (a free port, a temporary directory); build a small 3-layer OCI image
# from tars made here (files, a whiteout, an opaque directory, a symlink, a hard
# link) and push it with plain HTTP requests; convert it to an overlaybd image with
# `tcmu-obd convert` (pushed to the same registry); convert it again (every layer
# reused); then `tcmu-obd run --exit`: mount its ext4 read-only (on a TCMU device
# where the kernel has it, else FUSE + loop), list the files, print one, and show how many bytes were fetched from the
# registry against the image size.  Everything is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "$(id -u)" != 0 ]; then
    echo "demo_e2e: needs root (FUSE, loop devices, ext4 mounts)" >&2
    exit 1
fi
bash scripts/setup.sh

TMP=$(mktemp -d /tmp/obd-demo-e2e.XXXXXX)
REG_PID=""
cleanup() {
    if [ -n "$REG_PID" ]; then
        kill "$REG_PID" 2>/dev/null || true
        wait "$REG_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# the tcmu-obd subcommands, or the module until the lead wires them into tcmu-obd
if tcmu-obd convert --help >/dev/null 2>&1; then
    OBD=(tcmu-obd)
else
    OBD=("$PY" -m tcmu_obd.cli.convert)
fi

echo "== a private registry on 127.0.0.1"
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$TMP/registry.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  cache: {blobdescriptor: inmemory}
  filesystem: {rootdirectory: $TMP/registry}
  delete: {enabled: true}
http:
  addr: 127.0.0.1:$PORT
  secret: demo-e2e-secret
EOF
docker-registry serve "$TMP/registry.yml" > "$TMP/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 1 200); do
    if "$PY" -c "import requests,sys; sys.exit(requests.get('http://127.0.0.1:$PORT/v2/', timeout=1).status_code != 200)" 2>/dev/null; then
        break
    fi
    sleep 0.05
done
REG=127.0.0.1:$PORT
echo "registry: http://$REG (data in $TMP/registry)"

echo "== build and push a 3-layer OCI image: $REG/demo/app:v1"
"$PY" - "$REG" <<'EOF'
import gzip, hashlib, io, json, sys, tarfile, requests
base = "http://" + sys.argv[1]

def layer(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data, extra in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime = kind, 1700000000
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else extra.get("mode", 0o644)
            ti.linkname = extra.get("linkname", "")
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()

R, D, S, H = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
layers = [
    layer([("etc", D, b"", {}), ("etc/os-release", R, b'NAME="tcmu-obd demo"\n', {}),
           ("etc/motd", R, b"old motd\n", {}), ("bin", D, b"", {}),
           ("bin/hello", R, b"#!/bin/sh\necho hello from an overlaybd image\n", {"mode": 0o755}),
           ("var/cache", D, b"", {}), ("var/cache/a", R, b"a" * 4096, {}), ("var/cache/b", R, b"b", {}),
           ("data", D, b"", {}), ("data/blob", R, bytes(range(256)) * 8192, {})]),
    layer([("etc/.wh.motd", R, b"", {}),                                # whiteout
           ("etc/motd.d", D, b"", {}), ("etc/motd.d/welcome", R, b"Welcome to tcmu-obd!\n", {}),
           ("usr/bin", D, b"", {}), ("usr/bin/hello", S, b"", {"linkname": "/bin/hello"}),  # symlink
           ("bin/hi", H, b"", {"linkname": "bin/hello", "mode": 0o755})]),                 # hard link
    layer([("var/cache/.wh..wh..opq", R, b"", {}),                      # opaque directory
           ("var/cache/fresh", R, b"fresh\n", {})]),
]

def blob(data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    r = requests.post(f"{base}/v2/demo/app/blobs/uploads/", timeout=30)
    loc = r.headers["Location"]
    r = requests.put(loc + ("&" if "?" in loc else "?") + "digest=" + d, data=data, timeout=60)
    assert r.status_code == 201, r.text
    return d

descs = []
for raw in layers:
    gz = gzip.compress(raw, mtime=0)
    descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(gz), "size": len(gz)})
cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/hello"]},
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(l).hexdigest() for l in layers]}}).encode()
m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(cfg), "size": len(cfg)},
     "layers": descs}
r = requests.put(f"{base}/v2/demo/app/manifests/v1", data=json.dumps(m).encode(),
                 headers={"Content-Type": m["mediaType"]}, timeout=30)
assert r.status_code == 201, r.text
print(f"pushed {sys.argv[1]}/demo/app:v1: {len(layers)} layers, "
      f"{sum(d['size'] for d in descs)} bytes compressed, {sum(map(len, layers))} bytes of tar")
EOF

echo "== convert to overlaybd: $REG/demo/app:v1-obd"
"${OBD[@]}" convert "$REG/demo/app:v1" "$REG/demo/app:v1-obd" --db "$TMP/layers.db"

echo "== convert again: every layer comes from the layer database, same manifest"
"${OBD[@]}" convert "$REG/demo/app:v1" "$REG/demo/app:v1-obd" --db "$TMP/layers.db"

echo "== run it: mount read-only (TCMU or FUSE + loop, then ext4), list, read, show what was fetched"
"${OBD[@]}" run "$REG/demo/app:v1-obd" --exit --tree --cat etc/motd.d/welcome --cat usr/bin/hello

echo "== done; cleaning up"
