"""Test helpers shared by the untar (overlaybd-apply) and erofs tests: layer
tars written with Python's tarfile from compact entry lists, and a walk over
a real directory tree that stats every path once (kind, content digest or
link target, xattrs).  Each suite's own scan() shapes what it compares from
that walk.  Not a test module, and no model of the rules lives here.
"""
import hashlib
import io
import os
import stat
import tarfile

R, D, S, H = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
C, B, F = tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE
T0 = 1_700_000_000

KINDS = {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "sym", stat.S_IFCHR: "chr",
         stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo"}


def E(name, kind=R, data=b"", **kw):
    """One tar entry: (name, kind, data, attrs).  attrs: mode, uid, gid,
    mtime, linkname, devmajor, devminor, xattrs {name: bytes}, pax_mtime (str)."""
    return (name, kind, data, kw)


def tar_bytes(entries, fmt=tarfile.PAX_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, kind, data, kw in entries:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.mode = kw.get("mode", 0o755 if kind == D else 0o644)
            ti.uid, ti.gid = kw.get("uid", 0), kw.get("gid", 0)
            ti.uname = ti.gname = ""
            ti.mtime = kw.get("mtime", T0)
            ti.linkname = kw.get("linkname", "")
            ti.devmajor, ti.devminor = kw.get("devmajor", 0), kw.get("devminor", 0)
            pax = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                   for k, v in kw.get("xattrs", {}).items()}
            if "pax_mtime" in kw:
                pax["mtime"] = kw["pax_mtime"]
            ti.pax_headers = pax
            ti.size = len(data) if kind == R else 0
            t.addfile(ti, io.BytesIO(data) if kind == R else None)
    return buf.getvalue()


def walk(root):
    """(rel, stat result, kind, body, xattrs) for every path under root and
    root itself (rel ""), not following links: body is a regular file's
    sha256 hex, a symlink's target, else ""."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ([None] if dirpath == root else []):
            p = dirpath if name is None else os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            rel = "" if rel == "." else rel
            st = os.lstat(p)
            kind = KINDS[stat.S_IFMT(st.st_mode)]
            body = ""
            if kind == "reg":
                with open(p, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
            elif kind == "sym":
                body = os.readlink(p)
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False)
                      for k in os.listxattr(p, follow_symlinks=False)}
            yield rel, st, kind, body, xattrs
