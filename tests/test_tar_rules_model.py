"""format/tar_rules.py against small models: classify() of any member name
(the normalized path never climbs above the root, and the action follows the
last component), and walk() over an in-memory tree (symlinks followed
inside the root, '..' stopping there) against a plain resolver written
independently here."""
import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_obd.errors import ApplyError
from tcmu_obd.format import tar_rules as T

COMP = st.sampled_from(["a", "b", ".", "..", "", ".wh.a", ".wh..wh..opq", ".wh..wh.plnk", ".wh."])
NAMES = st.lists(COMP, max_size=6).map("/".join) | st.lists(COMP, max_size=6).map(lambda c: "/" + "/".join(c))


def model_components(name):
    out = []
    for c in name.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if out:
                out.pop()
        else:
            out.append(c)
    return out


@settings(max_examples=500, deadline=None)
@given(NAMES)
def test_tar_rules_classify_matches_the_model(name):
    comps = model_components(name)
    action, parent_rel, base = T.classify(name)
    assert T.norm(name) == "/".join(comps) and T.norm(T.norm(name)) == T.norm(name)
    if not comps:
        assert (action, parent_rel, base) == (T.ROOT, "", "")
        return
    last = comps[-1]
    assert parent_rel == "/".join(comps[:-1])
    if last == ".wh..wh..opq":
        assert action == T.OPAQUE
    elif last.startswith(".wh..wh."):
        assert action == T.META
    elif last.startswith(".wh."):
        assert (action, base) == (T.WHITEOUT, last[4:])
    else:
        assert (action, base) == (T.ENTRY, last)


# a tree: dict path -> "dir" | "file" | ("link", target); the root is ""
PATHS = ["a", "b", "a/b", "a/c", "b/a", "a/b/c"]
KIND = st.just("dir") | st.sampled_from(["file", ("link", "a"), ("link", "/b"), ("link", ".."), ("link", "a/b"),
                                         ("link", "b/.."), ("link", "c"), ("link", "/a/b/c"), None])
TREES = st.fixed_dictionaries({p: KIND for p in PATHS}).map(lambda t: {p: k for p, k in t.items() if k})
WALKS = st.lists(st.sampled_from(["a", "b", "c", "..", "."]), max_size=5) | \
    st.tuples(st.sampled_from(PATHS), st.lists(st.sampled_from(["a", "b", "c", ".."]), max_size=2)).map(
        lambda t: t[0].split("/") + t[1])


class DictTree:
    def __init__(self, tree):
        self.tree = tree
        self.made = []

    def lookup(self, node, name):
        p = posixpath.join(node, name) if node else name
        kind = self.tree.get(p)
        if kind is None:
            return None, None
        if isinstance(kind, tuple):
            return "link", kind[1]
        return ("dir" if kind == "dir" else "other"), p

    def mkdir(self, node, name):
        p = posixpath.join(node, name) if node else name
        self.tree[p] = "dir"
        self.made.append(p)
        return p


def model_walk(tree, comps, limit=T.MAX_SYMLINKS):
    """Independent resolver: (path, None) or (None, 'missing' | 'notdir' | 'loop')."""
    done, todo, links = [], list(comps), 0
    while todo:
        c = todo.pop(0)
        if c in ("", "."):
            continue
        if c == "..":
            if done:
                done.pop()
            continue
        p = "/".join(done + [c])
        kind = tree.get(p)
        if kind is None:
            return None, "missing"
        if isinstance(kind, tuple):
            links += 1
            if links > limit:
                return None, "loop"
            if kind[1].startswith("/"):
                done = []
            todo = [x for x in kind[1].split("/") if x] + todo
            continue
        if todo and kind != "dir":
            return None, "notdir"
        done.append(c)
    return "/".join(done), None


@settings(max_examples=1000, deadline=None)
@given(TREES, WALKS)
def test_tar_rules_walk_matches_the_model(tree, comps):
    # a tree whose parents are not directories cannot exist: drop such paths
    tree = {p: k for p, k in tree.items()
            if all(tree.get("/".join(p.split("/")[:i])) == "dir" for i in range(1, p.count("/") + 1))}
    want, err = model_walk(tree, comps)
    if err is None:
        assert T.walk(DictTree(dict(tree)), "", comps, where="w") == want
    else:
        with pytest.raises(ApplyError, match={"missing": "does not exist", "notdir": "is not a directory",
                                              "loop": "too many levels"}[err]):
            T.walk(DictTree(dict(tree)), "", comps, where="w")
