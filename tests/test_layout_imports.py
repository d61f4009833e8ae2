"""The dependency rules of the package layout, checked statically (ast) over
every module in tcmu_obd/, top-level and function-level imports both (the
import lines of the .pyx extensions too):
(a) only tcmu_obd/cli imports tcmu_obd.cli;
(b) no import cycles among top-level imports; a function-level import that
    would close one must carry a comment saying why and be listed below;
(c) no module imports another module's private names (`from x import _y`,
    `x._y`); a package's private submodule is its own package's business;
(d) rooms import only downward: base (errors, service_config, configfile)
    < core < format < remote < image < serve < build < cli.
What breaks a rule and must stay is listed with its reason; a listed
exception that no longer occurs fails too, so the lists stay true."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tcmu_obd"
ROOMS = ["base", "core", "format", "remote", "image", "serve", "build", "cli"]

# (importer, imported module or name) -> why it must stay
ALLOWED_UPWARD = {}
ALLOWED_CLI_IMPORTERS = {
    "tcmu_obd.__main__": "`python -m tcmu_obd` is the tcmu-obd console script, the CLI's entry point",
}
ALLOWED_PRIVATE = {
    ("tcmu_obd.serve._tcmu", "tcmu_obd.core._lsmt"):
        "the TCMU ring reads through the core's C entry point (a PyCapsule of _lsmt) without the GIL",
}
# (importer, imported) -> why the import is function-level
ALLOWED_CYCLE_BREAKERS = {}
# cycle breakers whose comment is still owed, and why it cannot be written here
COMMENT_OWED = {}


def module_name(path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room_of(mod):
    parts = mod.split(".")
    if mod == "tcmu_obd.__main__":
        return "cli"
    if len(parts) >= 2 and parts[1] in ROOMS:
        return parts[1]
    return "base"          # tcmu_obd itself and its top-level modules


def source_of(path):
    """A file's text; a Cython module's with the .pxi files it includes
    spliced in (their imports are the module's)."""
    text = path.read_text()
    if path.suffix != ".pyx":
        return text
    def expand(t):
        return re.sub(r'(?m)^include\s+"([^"]+)"[ \t]*(?:#.*)?$',
                      lambda m: expand((path.parent / m.group(1)).read_text()), t)
    return expand(text)


def parse(path):
    text = source_of(path)
    if path.suffix == ".py":
        return ast.parse(text), text.splitlines()
    # a Cython file: only its (c)import-free Python import statements, parsed one by one
    body = []
    for line in text.splitlines():
        m = re.match(r"\s*(from\s+tcmu_obd\S*\s+import\s+[\w ,]+|import\s+tcmu_obd\S*)\s*(#.*)?$", line)
        if m and "cimport" not in line:
            stmt = ast.parse(m.group(1)).body[0]
            stmt.lineno = 1
            # an indented import in a .pyx is inside a function
            body.append(stmt if not line[:1].isspace() else ast.FunctionDef(
                name="_", args=None, body=[stmt], decorator_list=[], lineno=1))
    return ast.Module(body=body, type_ignores=[]), text.splitlines()


def modules():
    return {module_name(p): p for p in sorted(ROOT.rglob("*")) if p.suffix in (".py", ".pyx")}


MODULES = modules()


def resolve(name):
    """The tcmu_obd module a dotted name refers to (a module or a name in one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(mod, tree, lines):
    """(imported module, names, line number, in a function?, line text) for each tcmu_obd import."""
    out = []

    def walk(node, in_func):
        for child in ast.iter_child_nodes(node):
            fn = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("tcmu_obd"):
                        out.append((a.name, [], child.lineno, in_func))
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("tcmu_obd"):
                names = [a.name for a in child.names]
                for n in names:       # `from pkg import submodule` imports the submodule
                    if f"{child.module}.{n}" in MODULES:
                        out.append((f"{child.module}.{n}", [], child.lineno, in_func))
                plain = [n for n in names if f"{child.module}.{n}" not in MODULES]
                if plain:
                    out.append((child.module, plain, child.lineno, in_func))
            walk(child, fn)
    walk(tree, False)
    return [(resolve(m), names, line, fn, lines[line - 1] if line <= len(lines) else "")
            for m, names, line, fn in out if resolve(m)]


GRAPH = {}
for _mod, _path in MODULES.items():
    _tree, _lines = parse(_path)
    GRAPH[_mod] = (imports_of(_mod, _tree, _lines), _tree)


def edges(top_only, graph=None):
    return {(m, target) for m, (imps, _) in (graph or GRAPH).items() for target, _, _, fn, _ in imps
            if target != m and not (top_only and fn)}


def test_layout_imports_found_the_package():
    assert {"tcmu_obd.image.config", "tcmu_obd.image.assemble", "tcmu_obd.cli.main",
            "tcmu_obd.core._lsmt", "tcmu_obd.serve._tcmu", "tcmu_obd.configfile"} <= set(MODULES)
    assert len(edges(False)) > 100


def test_layout_imports_only_cli_imports_cli():
    bad = {m for m, t in edges(False)
           if t.startswith("tcmu_obd.cli") and not m.startswith("tcmu_obd.cli")}
    assert bad == set(ALLOWED_CLI_IMPORTERS), bad


def cycles(graph_edges):
    succ = {}
    for a, b in graph_edges:
        succ.setdefault(a, set()).add(b)
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def strong(v):                      # Tarjan
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            strong(v)
    return out


def reaches(graph_edges, start, goal):
    succ = {}
    for a, b in graph_edges:
        succ.setdefault(a, set()).add(b)
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v == goal:
            return True
        if v not in seen:
            seen.add(v)
            todo.extend(succ.get(v, ()))
    return False


def test_layout_imports_no_cycles():
    top = edges(True)
    assert cycles(top) == []
    breakers = {}
    for m, (imps, _) in GRAPH.items():
        for target, _, line, fn, text in imps:
            if fn and target != m and reaches(top, target, m):
                breakers[(m, target)] = text
    assert set(breakers) == set(ALLOWED_CYCLE_BREAKERS), breakers
    for key, text in breakers.items():
        assert ("#" in text) != (key in COMMENT_OWED), f"{key}: a cycle-breaking import must say why in a comment"


def private_uses(mod, imps, tree):
    out = set()
    bound = {}                  # local name -> tcmu_obd module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tcmu_obd"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:
                    bound[a.asname or a.name] = full
                if a.name.startswith("_") and not a.name.startswith("__"):
                    target = full if full in MODULES else node.module
                    # a package's own private submodule is its package's business
                    if not (full in MODULES and mod.startswith(node.module + ".") or full == mod
                            or node.module == mod):
                        out.add((mod, target))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tcmu_obd") and a.asname:
                    bound[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and node.attr.startswith("_")
                and not node.attr.startswith("__") and bound[node.value.id] != mod):
            out.add((mod, bound[node.value.id]))
    return out


def test_layout_imports_no_private_names_across_modules():
    bad = set()
    for m, (imps, tree) in GRAPH.items():
        bad |= private_uses(m, imps, tree)
    assert bad == set(ALLOWED_PRIVATE), bad


def test_layout_imports_rooms_only_downward():
    bad = {(m, t) for m, t in edges(False) if ROOMS.index(room_of(t)) > ROOMS.index(room_of(m))}
    assert bad == set(ALLOWED_UPWARD), bad


@pytest.mark.parametrize("where", ["top", "function"])
def test_layout_imports_checker_catches_a_bad_import(where):
    """The checks fail on a deliberately bad import added to format/lsmt.py:
    upward (format -> serve and cli), of a private name, of the CLI, and
    closing a cycle (serve.handler -> image -> format.lsmt)."""
    src = ("from tcmu_obd.cli.common import _private\nfrom tcmu_obd.serve import handler\n"
           if where == "top" else
           "def f():\n    from tcmu_obd.cli.common import _private\n    from tcmu_obd.serve import handler\n")
    mod = "tcmu_obd.format.lsmt"
    imps, tree = GRAPH[mod]
    bad_tree = ast.parse(MODULES[mod].read_text() + "\n" + src)
    graph = dict(GRAPH)
    graph[mod] = (imports_of(mod, bad_tree, (MODULES[mod].read_text() + "\n" + src).splitlines()), bad_tree)
    added = set(edges(False, graph)) - set(edges(False))
    assert added == {(mod, "tcmu_obd.cli.common"), (mod, "tcmu_obd.serve.handler")}
    assert private_uses(mod, graph[mod][0], bad_tree) == {(mod, "tcmu_obd.cli.common")}
    assert {(m, t) for m, t in added if ROOMS.index(room_of(t)) > ROOMS.index(room_of(m))} == added
    assert any(t.startswith("tcmu_obd.cli") for _, t in added)
    if where == "top":
        assert any(mod in c for c in cycles(edges(True, graph)))
    else:
        assert cycles(edges(True, graph)) == [] and reaches(edges(True, graph), "tcmu_obd.serve.handler", mod)
