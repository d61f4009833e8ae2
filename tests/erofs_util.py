"""Helpers for the erofs meta-layer tests: make tars (tests/tar_tree.py),
build erofs metadata with ErofsBuilder, MATERIALIZE the image (a sparse file
with the metadata writes applied and every mapping filled from the tar's own
bytes, as the TurboOCI warp file would read it), mount it with the kernel,
and scan a mounted tree.  The model a tree is compared with is the same tars
unpacked by build/untar.py (overlaybd-apply's rules) into a real directory.
Not a test module; no assertions about erofs live here.
"""
import contextlib
import io
import os
import shutil
import subprocess
import tempfile

import pytest

from tar_tree import B, C, D, E, F, H, R, S, T0, tar_bytes, walk  # noqa: F401 -- the erofs tests import them from here
from tcmu_obd.build import untar
from tcmu_obd.format.erofs import ErofsBuilder, entries_from_tar

BS = 4096


def have_erofs():
    with open("/proc/filesystems") as f:
        if "erofs" not in f.read():
            pytest.skip("the kernel has no erofs")
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")


def build(tar, lower_image=None):
    """(writes, mappings, builder) for one layer tar over an optional lower image file."""
    lower = None
    if lower_image is not None:
        with open(lower_image, "rb") as f:
            lower_bytes = f.read()
        lower = lambda off, n: lower_bytes[off:off + n]     # noqa: E731
    b = ErofsBuilder(4096, lower=lower, name="layer")
    for e in entries_from_tar(io.BytesIO(tar)):
        b.add(e)
    writes, mappings = b.finish()
    return writes, mappings, b


def materialize(path, tar, writes, mappings, base=None):
    """The block device a TurboOCI warp layer reads as: `base` (the lower
    image) or zeros, the metadata writes, each mapping filled from `tar`."""
    if base is not None:
        shutil.copyfile(base, path)
    end = 0
    with open(path, "r+b" if base is not None else "wb") as f:
        for off, data in writes:
            f.seek(off)
            f.write(data)
            end = max(end, off + len(data))
        for off, length, toff in mappings:
            assert off % 512 == 0 and length % 512 == 0 and toff % 512 == 0
            chunk = tar[toff:toff + length]
            assert len(chunk) == length, "a mapping reaches past the tar"
            f.seek(off)
            f.write(chunk)
            end = max(end, off + length)
        size = max(f.seek(0, 2), (end + BS - 1) // BS * BS)
        f.truncate(size)
    return path


@contextlib.contextmanager
def mounted(image):
    mnt = tempfile.mkdtemp(prefix="erofs-mnt-")
    r = subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), mnt],
                       capture_output=True, text=True)
    if r.returncode:
        os.rmdir(mnt)
        raise AssertionError(f"mount -t erofs failed: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)


def fsck(image):
    """fsck.erofs (1.5) --extract on the image: (returncode, output)."""
    if shutil.which("fsck.erofs") is None:
        pytest.skip("fsck.erofs is not installed (apt-get install erofs-utils)")
    out = tempfile.mkdtemp(prefix="erofs-fsck-")
    try:
        r = subprocess.run(["fsck.erofs", f"--extract={out}/x", str(image)], capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr
    finally:
        shutil.rmtree(out, True)


def oracle(tmp, tars):
    """The tars unpacked by build/untar.py (overlaybd-apply's rules) into a real directory."""
    root = os.path.join(str(tmp), "oracle")
    os.makedirs(root, exist_ok=True)
    for tar in tars:
        untar.untar(io.BytesIO(tar), root)
    return root


def scan(root):
    """{rel: {kind, mode, uid, gid, size, body, rdev, xattrs, mtime_ns, nlink}} plus
    the hard-link groups (sorted lists of paths sharing an inode)."""
    out, by_ino = {}, {}
    for rel, st, kind, body, xattrs in walk(root):
        out[rel] = dict(kind=kind, mode=oct(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                        size=st.st_size if kind != "dir" else None, body=body,
                        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), xattrs=xattrs,
                        mtime_ns=st.st_mtime_ns, nlink=st.st_nlink)
        if kind != "dir":
            by_ino.setdefault(st.st_ino, []).append(rel)
    return out, sorted(sorted(g) for g in by_ino.values())


def diff(got, want, skip_mtime=()):
    """Differences between two scans, as a list of (path, field, got, want)."""
    (g, gl), (w, wl) = got, want
    problems = [(p, "missing", None, None) for p in sorted(set(w) - set(g))]
    problems += [(p, "unexpected", None, None) for p in sorted(set(g) - set(w))]
    for p in sorted(set(g) & set(w)):
        for k in w[p]:
            if k == "mtime_ns" and p in skip_mtime:
                continue
            if g[p][k] != w[p][k]:
                problems.append((p, k, g[p][k], w[p][k]))
    if gl != wl:
        problems.append(("*", "hard-link groups", gl, wl))
    return problems
