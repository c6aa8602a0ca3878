"""zoo's layering, checked statically: imports point down, there are no import cycles, and no module
touches another module's private names.

The source is read with `ast`, never imported, so the check is fast and sees every import: the
module-level ones and the lazy ones inside functions alike (only imports under
`if TYPE_CHECKING:` are left out, since they never run). See docs/ARCHITECTURE.md, "Modules".

The checker functions take a package folder and a layer table, so `test_checker_detects_violations`
can run them on a small fake package and show that they find what they are meant to find.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"

# Top to bottom. A module may import modules of its own layer or of a layer below it, never above.
# A pattern "a.b.*" is the module a.b and everything under it; a pattern without ".*" is that one
# module. A module belongs to the layer of its longest matching pattern, so "zoo.pd.cli" (an entry
# point) wins over "zoo.pd.*" (a service).
ZOO_LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entrypoints", ("zoo.entrypoints.*", "zoo.llama.*", "zoo.qwen.*", "zoo.export", "zoo.quantize",
                     "zoo.serve.__main__", "zoo.pd.__main__", "zoo.pd.cli")),
    ("services", ("zoo.serve.*", "zoo.pd.*")),
    ("api", ("zoo", "zoo.api", "zoo.settings")),
    ("engine", ("zoo.engine.*",)),
    ("graphs", ("zoo.graphs.*",)),
    ("backends", ("zoo.backends.*",)),
    ("models", ("zoo.models.*",)),
    ("layers", ("zoo.layers.*",)),
    ("distributed", ("zoo.distributed.*",)),
    ("config/device/io", ("zoo.config", "zoo.device", "zoo.loader", "zoo.tokenizers.*")),
    ("leaves", ("zoo.errors", "zoo._version", "zoo.log")),
]

# Accesses `obj._name` that the private-name rule would flag but that are not a zoo module's private
# name: (accessing module, attribute) -> why it is fine. Keep each entry justified.
PRIVATE_ACCESS_ALLOWLIST: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------------------------
# Reading the package


@dataclass(frozen=True)
class Edge:
    src: str        # importing module
    dst: str        # imported module
    path: Path
    line: int


@dataclass(frozen=True)
class PrivateImport:
    src: str
    dst: str        # module the name is imported from
    name: str
    path: Path
    line: int


def module_name(pkg_dir: Path, path: Path) -> str:
    parts = [pkg_dir.name, *path.relative_to(pkg_dir).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def collect_modules(pkg_dir: Path) -> dict[str, Path]:
    """Every module of the package: module name -> source file (__init__.py for a package)."""
    return {module_name(pkg_dir, p): p for p in sorted(pkg_dir.rglob("*.py"))}


def _packages(pkg_dir: Path) -> set[str]:
    """Every folder of the package holding Python files (a namespace package if it has no __init__)."""
    names = set()
    for p in pkg_dir.rglob("*.py"):
        for parent in p.parents:
            if parent == pkg_dir.parent:
                break
            names.add(module_name(pkg_dir, parent / "__init__.py"))
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.AST):
    """Every Import / ImportFrom anywhere in the tree (functions included), except in the body of an
    `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


class ImportGraph:
    """The package's modules and the imports between them, read from source."""

    def __init__(self, pkg_dir: Path):
        self.pkg_dir = Path(pkg_dir)
        self.pkg = self.pkg_dir.name
        self.modules = collect_modules(self.pkg_dir)
        self.known = set(self.modules) | _packages(self.pkg_dir)
        self.trees = {m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in self.modules.items()}
        self.edges: list[Edge] = []
        self.private_imports: list[PrivateImport] = []
        self.unresolved: list[tuple[str, str, Path, int]] = []  # (module, imported name, file, line)
        for mod, tree in self.trees.items():
            for node in _import_statements(tree):
                self._add(mod, node)

    def _in_pkg(self, name: str) -> bool:
        return name == self.pkg or name.startswith(self.pkg + ".")

    def _edge(self, src: str, dst: str, node: ast.stmt) -> None:
        self.edges.append(Edge(src, dst, self.modules[src], node.lineno))

    def _base(self, mod: str, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        is_pkg = self.modules[mod].name == "__init__.py"
        parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
        if node.level > 1:
            parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def _add(self, mod: str, node: ast.stmt) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not self._in_pkg(alias.name):
                    continue
                if alias.name in self.known:
                    self._edge(mod, alias.name, node)
                else:
                    self.unresolved.append((mod, alias.name, self.modules[mod], node.lineno))
            return
        base = self._base(mod, node)
        if not base or not self._in_pkg(base):
            return
        if base not in self.known:
            self.unresolved.append((mod, base, self.modules[mod], node.lineno))
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.known:                   # `from pkg.x import y`, y a module (even `_y`: a
                self._edge(mod, sub, node)          # module's public names are what gets used)
                continue
            self._edge(mod, base, node)             # `from pkg.x import y`, y a name in pkg.x
            if _is_private(alias.name) and base != mod:
                self.private_imports.append(PrivateImport(mod, base, alias.name, self.modules[mod], node.lineno))

    def graph(self) -> dict[str, set[str]]:
        g: dict[str, set[str]] = {m: set() for m in self.known}
        for e in self.edges:
            g[e.src].add(e.dst)
        return g

    def where(self, path: Path, line: int) -> str:
        return f"{path.relative_to(self.pkg_dir.parent)}:{line}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_"


# ---------------------------------------------------------------------------------------------------
# Cycles


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        scc.append(member)
                        if member == node:
                            break
                    sccs.append(sorted(scc))
    return sccs


def find_cycles(pkg_dir: Path) -> list[str]:
    """One message per import cycle: its modules and the imports that close it."""
    ig = ImportGraph(pkg_dir)
    graph = ig.graph()
    problems = []
    for scc in strongly_connected_components(graph):
        if len(scc) == 1 and scc[0] not in graph[scc[0]]:
            continue
        members = set(scc)
        imports = sorted({f"    {e.src} -> {e.dst} ({ig.where(e.path, e.line)})"
                          for e in ig.edges if e.src in members and e.dst in members})
        problems.append("cycle: " + ", ".join(scc) + "\n" + "\n".join(imports))
    return problems


# ---------------------------------------------------------------------------------------------------
# Layers


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]]) -> int | None:
    """Index of the module's layer (0 = top): the layer of its longest matching pattern."""
    best, best_len = None, -1
    for i, (_, patterns) in enumerate(layers):
        for pattern in patterns:
            if pattern.endswith(".*"):
                stem = pattern[:-2]
                hit = module == stem or module.startswith(stem + ".")
            else:
                stem = pattern
                hit = module == stem
            if hit and len(stem) > best_len:
                best, best_len = i, len(stem)
    return best


def unmapped_modules(pkg_dir: Path, layers) -> list[str]:
    return sorted(m for m in collect_modules(Path(pkg_dir)) if layer_of(m, layers) is None)


def upward_imports(pkg_dir: Path, layers) -> list[str]:
    """One message per import of a higher layer's module."""
    ig = ImportGraph(pkg_dir)
    problems = []
    for e in ig.edges:
        a, b = layer_of(e.src, layers), layer_of(e.dst, layers)
        if a is None or b is None:
            continue  # reported by unmapped_modules (a namespace package holding no code maps by its files)
        if b < a:
            problems.append(f"{ig.where(e.path, e.line)}: {e.src} -> {e.dst} "
                            f"({layers[a][0]} -> {layers[b][0]})")
    return sorted(set(problems))


def unresolved_imports(pkg_dir: Path) -> list[str]:
    """Imports of package modules that do not exist (they would fail at run time, and they would hide
    an edge from the checks above)."""
    ig = ImportGraph(pkg_dir)
    return sorted(f"{ig.where(p, line)}: {mod} imports {name}, which is not a module of {ig.pkg}"
                  for mod, name, p, line in ig.unresolved)


# ---------------------------------------------------------------------------------------------------
# Private names


def _self_attr_targets(node: ast.AST):
    for t in ast.walk(node):
        if (isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store)
                and isinstance(t.value, ast.Name) and t.value.id in ("self", "cls")):
            yield t.attr


def _assigned_names(stmt: ast.stmt):
    targets = []
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        targets = [stmt.target]
    for t in targets:
        for n in ast.walk(t):
            if isinstance(n, ast.Name):
                yield n.id


def _scope_names(body: list[ast.stmt]):
    """Names bound directly in a module or class body (through if / try / with / for blocks, not
    into functions or nested classes' bodies)."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield stmt.name
        else:
            yield from _assigned_names(stmt)
            for field in ("body", "orelse", "finalbody"):
                yield from _scope_names(getattr(stmt, field, []) or [])
            for handler in getattr(stmt, "handlers", []) or []:
                yield from _scope_names(handler.body)


def private_definitions(tree: ast.Module) -> set[str]:
    """Private names a module defines: module-level `_x`, class members `_x` (methods and class
    attributes), and `self._x = ...` / `cls._x = ...` attributes."""
    names = set(_scope_names(tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names.update(_scope_names(node.body))
    names.update(_self_attr_targets(tree))
    return {n for n in names if _is_private(n)}


def _is_own_object(value: ast.expr) -> bool:
    if isinstance(value, ast.Name) and value.id in ("self", "cls"):
        return True
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super")


def private_name_violations(pkg_dir: Path, allowlist: dict[tuple[str, str], str] | None = None) -> list[str]:
    """(a) `from pkg.x import _name` from another module; (b) `obj._name` (obj not self / cls /
    super()) where `_name` is private to a different module of the package and not defined in the
    accessing module itself."""
    allowlist = allowlist or {}
    ig = ImportGraph(pkg_dir)
    problems = [f"{ig.where(p.path, p.line)}: {p.src} imports private {p.dst}.{p.name}"
                for p in ig.private_imports]
    defined = {m: private_definitions(t) for m, t in ig.trees.items()}
    owners: dict[str, set[str]] = {}
    for m, names in defined.items():
        for n in names:
            owners.setdefault(n, set()).add(m)
    for mod, tree in ig.trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            if _is_own_object(node.value) or node.attr in defined[mod] or node.attr not in owners:
                continue
            if (mod, node.attr) in allowlist:
                continue
            problems.append(f"{ig.where(ig.modules[mod], node.lineno)}: {mod} touches {ast.unparse(node)} "
                            f"(private to {', '.join(sorted(owners[node.attr]))})")
    return sorted(problems)


# ---------------------------------------------------------------------------------------------------
# The tests on zoo


def _fail(title: str, problems: list[str]) -> None:
    assert not problems, f"{title} ({len(problems)}):\n" + "\n".join(problems)


def test_zoo_has_modules():
    ig = ImportGraph(ZOO_DIR)
    assert len(ig.modules) > 20 and len(ig.edges) > 20  # the checks below are not looking at nothing


def test_no_import_cycles():
    _fail("import cycles", find_cycles(ZOO_DIR))


def test_imports_point_down():
    _fail("modules in no layer: place them in ZOO_LAYERS (tests/test_layering.py) and in "
          "docs/ARCHITECTURE.md", unmapped_modules(ZOO_DIR, ZOO_LAYERS))
    _fail("imports of a higher layer", upward_imports(ZOO_DIR, ZOO_LAYERS))


def test_zoo_imports_resolve():
    _fail("imports of zoo modules that do not exist", unresolved_imports(ZOO_DIR))


def test_no_private_names_across_modules():
    _fail("private names used outside their module", private_name_violations(ZOO_DIR, PRIVATE_ACCESS_ALLOWLIST))


# ---------------------------------------------------------------------------------------------------
# The checker finds what it should


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "fake"


FAKE_LAYERS = [
    ("top", ("fake.top.*",)),
    ("mid", ("fake", "fake.mid.*")),
    ("low", ("fake.low.*", "fake.leaf")),
]


def test_checker_detects_violations(tmp_path):
    pkg = _write(tmp_path, {
        "fake/__init__.py": "from fake.mid import a\n",
        "fake/leaf.py": "_SECRET = 1\n",
        "fake/top/__init__.py": "",
        "fake/top/cli.py": "import fake.mid.a\n",
        "fake/mid/__init__.py": "",
        # a <-> b, the second edge lazy and relative
        "fake/mid/a.py": "from fake.mid import b\n",
        "fake/mid/c.py": "THING = 1\ndef f():\n    from fake.mid.c import THING\n    return THING\n",  # self-edge
        "fake/mid/b.py": ("def f():\n"
                          "    from . import a\n"
                          "    return a\n"),
        # low -> top (upward, lazy); a private import; a private attribute of another module
        "fake/low/__init__.py": "",
        "fake/low/x.py": ("from typing import TYPE_CHECKING\n"
                          "from fake.leaf import _SECRET\n"
                          "if TYPE_CHECKING:\n"
                          "    from fake.top import cli\n"           # not an edge
                          "class X:\n"
                          "    def __init__(self):\n"
                          "        self._mine = 1\n"
                          "    def _helper(self):\n"
                          "        return self._mine\n"
                          "def g(y):\n"
                          "    import fake.top.cli\n"                # upward
                          "    return y._state, y._mine, y._helper, y._unknown, super()._state\n"),
        "fake/low/y.py": ("class Y:\n"
                          "    _state = 0\n"
                          "    def __init__(self):\n"
                          "        self._other = 2\n"),
        "fake/low/z.py": "from ..leaf import _SECRET\nimport fake.nothing\n",
    })

    cycles = find_cycles(pkg)
    assert len(cycles) == 2, cycles
    assert cycles[0].startswith("cycle: fake.mid.a, fake.mid.b\n"), cycles
    assert "fake.mid.b -> fake.mid.a (fake/mid/b.py:2)" in cycles[0], cycles
    assert cycles[1].startswith("cycle: fake.mid.c\n"), cycles

    up = upward_imports(pkg, FAKE_LAYERS)
    assert len(up) == 1 and "fake/low/x.py:11: fake.low.x -> fake.top.cli (low -> top)" in up[0], up
    assert unmapped_modules(pkg, FAKE_LAYERS) == []
    assert unmapped_modules(pkg, FAKE_LAYERS[:2]) == ["fake.leaf", "fake.low", "fake.low.x", "fake.low.y", "fake.low.z"]
    assert unresolved_imports(pkg) == ["fake/low/z.py:2: fake.low.z imports fake.nothing, which is not a module of fake"]

    private = private_name_violations(pkg)
    assert any("fake/low/x.py:2:" in p and "private fake.leaf._SECRET" in p for p in private), private
    assert any("fake/low/z.py:1:" in p and "private fake.leaf._SECRET" in p for p in private), private
    assert any("fake/low/x.py:12:" in p and "y._state" in p and "fake.low.y" in p for p in private), private
    assert not any("_mine" in p or "_helper" in p or "_unknown" in p or "super()" in p for p in private), private
    assert len(private) == 3, private
    allowed = private_name_violations(pkg, {("fake.low.x", "_state"): "test"})
    assert len(allowed) == 2 and not any("_state" in p for p in allowed), allowed

    # layer_of: the longest pattern wins, and "pkg" alone is not "pkg.*"
    layers = [("a", ("p.x.cli",)), ("b", ("p.x.*", "p"))]
    assert layer_of("p.x.cli", layers) == 0
    assert layer_of("p.x.other", layers) == 1 and layer_of("p.x", layers) == 1 and layer_of("p", layers) == 1
    assert layer_of("p.y", layers) is None


def test_cycle_finder_self_edge_and_long_cycle():
    sccs = strongly_connected_components({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": set()})
    assert sorted(sccs) == [["a", "b", "c"], ["d"], ["e"]]
