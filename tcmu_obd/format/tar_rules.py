"""overlaybd-apply's rules for the members of a layer tar, whatever they are
applied to: build/untar.py applies them to a real directory, format/erofs.py
to an erofs tree in memory.  Here: a member's name normalized (never above
the root) and classified (the root itself, a whiteout of a name, an opaque
marker, an ignored whiteout meta file, or an entry to make), the walk down a
path that follows symlinks inside the root, and PAX times.

Not the actions themselves (making files, removing trees, attributes): each
tree does those its own way, through the small interface walk() takes.
"""
import posixpath

from tcmu_obd.errors import ApplyError

WH_PREFIX = ".wh."
WH_META = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."
MAX_SYMLINKS = 255

ROOT, OPAQUE, META, WHITEOUT, ENTRY = "root", "opaque", "meta", "whiteout", "entry"


def norm(name):
    """Tar member name -> root-relative normalized path ('' = the root)."""
    return posixpath.normpath("/" + name).lstrip("/")     # '..' can never climb above '/'


def classify(name):
    """(action, parent_rel, base) of a member name.  ROOT: the name is the
    root itself (only a directory may be: the caller refuses anything else);
    OPAQUE: `.wh..wh..opq`, empty parent_rel; META: another `.wh..wh.*` name,
    ignored; WHITEOUT: `.wh.NAME`, base is NAME, to be removed; ENTRY: make
    parent_rel/base."""
    parent_rel, base = posixpath.split(norm(name))
    if not base:
        return ROOT, "", ""
    if base == WH_OPAQUE:
        return OPAQUE, parent_rel, base
    if base.startswith(WH_META):
        return META, parent_rel, base
    if base.startswith(WH_PREFIX):
        return WHITEOUT, parent_rel, base[len(WH_PREFIX):]
    return ENTRY, parent_rel, base


def walk(tree, root, rel, create=False, need_dir=False, where=""):
    """The node of path `rel` (a str, or a list of components) walked down
    from `root` as if it were "/": '..' stops at root, every symlink is
    followed inside the tree (absolute targets restart at root; at most
    MAX_SYMLINKS).  A missing component raises ApplyError, or is made by
    tree.mkdir(node, name) when `create`; every component but the last must
    be a directory (the last too with need_dir).  tree.lookup(node, name)
    answers (None, None) when missing, ("link", target str), ("dir", child)
    or ("other", child).  Errors start with `where`."""
    todo = [c for c in rel.split("/") if c] if isinstance(rel, str) else list(rel)
    done, names, links = [root], [], 0
    while todo:
        c = todo.pop(0)
        if c in ("", "."):
            continue
        if c == "..":
            if names:
                done.pop()
                names.pop()
            continue
        kind, node = tree.lookup(done[-1], c)
        if kind is None:
            if not create:
                raise ApplyError(f"{where}: {'/'.join(names + [c])} does not exist")
            done.append(tree.mkdir(done[-1], c))
            names.append(c)
            continue
        if kind == "link":
            links += 1
            if links > MAX_SYMLINKS:
                raise ApplyError(f"{where}: too many levels of symbolic links")
            if node.startswith("/"):
                done, names = [root], []
            todo = [x for x in node.split("/") if x] + todo
            continue
        if (todo or need_dir) and kind != "dir":
            raise ApplyError(f"{where}: {c} in {'/'.join(names + [c])} is not a directory")
        done.append(node)
        names.append(c)
    return done[-1]


def pax_time_ns(pax_text, seconds, default=None):
    """Nanoseconds from a PAX time string ("1700000000.123456789"), else from
    `seconds` (int or float), else `default`."""
    if pax_text:
        sign = -1 if pax_text.startswith("-") else 1
        whole, _, frac = pax_text.lstrip("-").partition(".")
        try:
            return sign * (int(whole or "0") * 10**9 + int((frac + "000000000")[:9]))
        except ValueError:
            pass
    if seconds is None:
        return default
    return int(seconds) * 10**9 + int(round((seconds - int(seconds)) * 1e9))
