"""Property: for random small layer tars (names incl. long and non-ASCII
ones, every entry type, odd sizes, modes, owners, times, user xattrs, hard
links, symlinks to directories used as parents) and a random second layer
(whiteouts, opaque directories, replacements), the materialized erofs image
mounts as build/untar.py unpacks the same tars.  Few examples: each builds,
mounts and unpacks two layers."""
import posixpath

import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings, strategies as st

from erofs_util import C, D, E, F, H, R, S, T0, build, diff, have_erofs, materialize, mounted, \
    oracle, scan, tar_bytes

from tcmu_obd.errors import ApplyError

NAME = st.one_of(
    st.text("abcAB-_.é0", min_size=1, max_size=6),
    st.builds(lambda n: "L" * n, st.integers(200, 255)),
).filter(lambda n: n not in (".", "..") and not n.startswith(".wh."))
SIZE = st.one_of(st.sampled_from([0, 1, 511, 512, 513, 4095, 4096, 4097, 8193]), st.integers(0, 20000))
ATTRS = st.fixed_dictionaries({
    "mode": st.integers(0, 0o7777),
    "uid": st.one_of(st.integers(0, 70000), st.just(4_000_000_000)),
    "gid": st.integers(0, 70000),
    "mtime": st.integers(0, 2**33),
})
XATTRS = st.dictionaries(st.text("abcxyz.", min_size=1, max_size=8).map(lambda s: "user." + s),
                         st.binary(max_size=300), max_size=3)


def _drop(dirs, files, top):
    """Forget `top` and everything under it (whited out or replaced)."""
    for known in (dirs, files):
        for p in list(known):
            if p and (top == "" or p == top or p.startswith(top + "/")):
                known.discard(p)


@st.composite
def layer(draw, dirs, files, allow_whiteouts):
    """Entries of one layer; `dirs`/`files` are the paths known so far (updated)."""
    entries = [E(".", D, mode=0o755, mtime=T0)]
    for _ in range(draw(st.integers(1, 14))):
        parent = draw(st.sampled_from(sorted(dirs)))
        path = posixpath.join(parent, draw(NAME)) if parent else draw(NAME)
        kind = draw(st.sampled_from(["file", "file", "dir", "dir", "sym", "symdir", "hard", "fifo", "chr"]
                                    + (["wh", "wh", "opq"] if allow_whiteouts else [])))
        attrs = draw(ATTRS)
        if kind == "file":
            data = bytes([draw(st.integers(0, 255))]) * draw(SIZE)
            entries.append(E(path, R, data, xattrs=draw(XATTRS), **attrs))
            _drop(dirs, files, path)
            files.add(path)
            dirs.discard(path)
        elif kind == "dir":
            if attrs["mode"] & 0o700 != 0o700:
                attrs["mode"] |= 0o700            # untar must be able to fill it
            entries.append(E(path, D, xattrs=draw(XATTRS), **attrs))
            dirs.add(path)
            files.discard(path)
        elif kind in ("sym", "symdir"):
            if kind == "symdir":
                target = "/" + draw(st.sampled_from(sorted(dirs)))
            else:
                target = draw(st.text("ab/.", min_size=1, max_size=draw(st.sampled_from([8, 4000]))))
            entries.append(E(path, S, linkname=target, uid=attrs["uid"], gid=attrs["gid"],
                             mtime=attrs["mtime"]))
            files.add(path)
            dirs.discard(path)
        elif kind == "hard":
            if not files:
                continue
            entries.append(E(path, H, linkname=draw(st.sampled_from(sorted(files))), **attrs))
            files.add(path)
            dirs.discard(path)
        elif kind == "fifo":
            entries.append(E(path, F, **attrs))
            files.add(path)
            dirs.discard(path)
        elif kind == "chr":
            entries.append(E(path, C, devmajor=draw(st.integers(0, 4095)),
                             devminor=draw(st.integers(0, 2**20 - 1)), **attrs))
            files.add(path)
            dirs.discard(path)
        elif kind == "wh":
            victim = draw(st.sampled_from(sorted((dirs - {""}) | files))) if len(dirs) > 1 or files else None
            if victim is None:
                continue
            head, tail = posixpath.split(victim)
            entries.append(E(posixpath.join(head, ".wh." + tail), R))
            _drop(dirs, files, victim)
        else:
            entries.append(E(posixpath.join(parent, ".wh..wh..opq"), R))
            _drop(dirs, files, parent)
    return entries


@st.composite
def two_layers(draw):
    dirs, files = {""}, set()
    first = draw(layer(dirs, files, False))
    second = draw(layer(dirs, files, True))
    return first, second


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])     # shrinking remounts too often
@given(layers=two_layers())
def test_erofs_random_trees_mount_like_untar(tmp_path_factory, layers):
    have_erofs()
    tmp = tmp_path_factory.mktemp("rt")
    tars = [tar_bytes(entries) for entries in layers]
    lower = None
    for i, tar in enumerate(tars):
        # a tar that overlaybd-apply refuses (a hard link to a path a whiteout
        # removed, a file where a directory is needed) is refused here too
        try:
            want = scan(oracle(tmp / f"o{i}", tars[:i + 1]))
        except (ApplyError, OSError) as e:
            with pytest.raises(ApplyError):
                build(tar, lower)
            note(f"both refuse layer {i}: {e}")
            event(f"refused at layer {i}")
            return
        writes, mappings, _b = build(tar, lower)
        img = materialize(tmp / f"l{i}.img", tar, writes, mappings, base=lower)
        with mounted(img) as mnt:
            got = scan(mnt)
        # directories changed by a later layer without their own entry take the
        # unlink/create time on untar's real directory; erofs keeps the tar's
        listed = {"" if e[0] == "." else posixpath.normpath(e[0]) for e in layers[i] if e[1] == D}
        skip = {p for p, v in want[0].items() if v["kind"] == "dir" and p not in listed} if i else ()
        assert diff(got, want, skip_mtime=skip) == [], f"layer {i}"
        lower = img
    event("both layers mounted")
