"""No import cycle in `cluster/`: a cycle makes a module's names depend on which module of the loop was imported
first (a partially initialised module), and marks two modules that should be one, or a contract that lives with an
implementation.

The graph is read with `ast`, nothing is imported: every import statement counts (module level and inside functions,
`try` bodies included), except those under `if TYPE_CHECKING:`, which never run. An edge goes to the module an
import names: `from pkg import sub` to the submodule `pkg.sub` when there is one, else to `pkg`; relative imports
are resolved against the importing module's package. Parent packages, which Python initialises first, get no edge
of their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "cluster"

# importer -> imported -> the import lines ("path:line: source") that make the edge
Graph = dict[str, dict[str, list[str]]]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package directory `root` (a package is its __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


class _Imports(ast.NodeVisitor):
    """(line, absolute target names) of every import that runs, skipping `if TYPE_CHECKING:` bodies."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[int, list[str]]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # the `else:` of `if TYPE_CHECKING:` runs
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node.lineno, [alias.name for alias in node.names]))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        # `from base import name`: name may be a submodule; which it is, the graph decides (see _target).
        self.found.append((node.lineno, [f"{base}\0{alias.name}" for alias in node.names]))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The package module an import names, or None for one outside the package."""
    if "\0" in name:
        base, attr = name.split("\0")
        if f"{base}.{attr}" in modules:
            return f"{base}.{attr}"
        name = base
    return name if name in modules else None


def import_graph(root: Path) -> Graph:
    modules = module_names(root)
    graph: Graph = {m: {} for m in modules}
    for module, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(source, str(path)))
        for lineno, names in visitor.found:
            for name in names:
                target = _target(name, modules)
                if target is not None:
                    where = f"{path.relative_to(root.parent)}:{lineno}: {lines[lineno - 1].strip()}"
                    wheres = graph[module].setdefault(target, [])
                    if where not in wheres:  # `from m import a, b` is one line
                        wheres.append(where)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of 2+ modules, and modules that import themselves (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(graph: Graph, component: list[str]) -> str:
    members = set(component)
    lines = [" <-> ".join(component)]
    for a in component:
        for b in sorted(graph[a]):
            if b in members:
                lines += [f"    {a} -> {b}"] + [f"        {where}" for where in graph[a][b]]
    return "\n".join(lines)


def test_cluster_has_no_import_cycle():
    graph = import_graph(PACKAGE_ROOT)
    assert "cluster.moe.backend" in graph and graph["cluster.model.loader"], "the walk found the package's imports"
    found = cycles(graph)
    assert not found, "import cycles in cluster/:\n" + "\n".join(describe(graph, c) for c in found)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("files, want", [
    # relative import of a submodule one way, absolute import inside a function the other
    ({"pkg/__init__.py": "", "pkg/a/__init__.py": "", "pkg/a/x.py": "from . import y\n",
      "pkg/a/y.py": "def f():\n    import pkg.a.x\n"}, [["pkg.a.x", "pkg.a.y"]]),
    # `from ..b import name` (a name, not a submodule) reaches pkg.b's own module; a three-module loop
    ({"pkg/__init__.py": "", "pkg/b.py": "from pkg.c.d import g\n", "pkg/c/__init__.py": "",
      "pkg/c/d.py": "from pkg.c import e\n", "pkg/c/e.py": "from ..b import h\n"}, [["pkg.b", "pkg.c.d", "pkg.c.e"]]),
    # a self-import is a cycle
    ({"pkg/__init__.py": "", "pkg/s.py": "import pkg.s\n"}, [["pkg.s"]]),
    # `if TYPE_CHECKING:` never runs, its `else:` does; an outside module is no edge
    ({"pkg/__init__.py": "", "pkg/p.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
      "    from pkg import q\n", "pkg/q.py": "import pkg.p\n"}, []),
    ({"pkg/__init__.py": "", "pkg/p.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n"
      "    from pkg.q import z\n", "pkg/q.py": "import pkg.p\n"}, [["pkg.p", "pkg.q"]]),
], ids=["relative-and-in-function", "three-module-loop", "self-import", "type-checking-skipped",
        "type-checking-else-runs"])
def test_the_walk_finds_cycles(tmp_path: Path, files: dict[str, str], want: list[list[str]]):
    assert cycles(import_graph(_write(tmp_path, files))) == want
