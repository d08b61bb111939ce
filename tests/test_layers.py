"""The packages of `cluster/` form layers, and no import goes up: the HTTP API never imports Serve, the engine never
imports the API or the metrics, the transports never import the engine. A piece two layers share moves down to the
lower one (as `cluster.health` did), so each layer can be read, tested and run (the GPU machine has no Ray) without
the ones above it.

The graph is `test_import_cycles.import_graph`'s: every import that runs, in functions too, none under
`if TYPE_CHECKING:`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_import_cycles import PACKAGE_ROOT, Graph, import_graph

# Package (or top-level module) -> its layer: a module may import its own package and any lower layer.
LAYERS: dict[str, int] = {
    "cluster": 0, "config": 0, "dtype": 0, "user_cache": 0, "health": 0, "logs": 0,  # shared primitives
    "checkpoint": 1, "tokenizer": 1, "kernels": 1, "ledger": 1,
    "moe": 2,
    "model": 3,
    "attention": 4, "parallel": 4,  # attention reads the model's cache contract; the transports carry experts
    "engine": 5,
    "metrics": 6, "generate": 6,
    "api": 7,
    "serve": 8,
    "cli": 9,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(graph: Graph, layers: dict[str, int]) -> list[str]:
    """Every import from a lower layer to a higher one, as 'importer -> imported' with its source lines; a package
    missing from `layers` is reported too (a new package takes its place in the table)."""
    unplaced = sorted({_package(m) for m in graph} - set(layers))
    found = [f"package {name!r} has no layer in tests/test_layers.py" for name in unplaced]
    for importer, targets in sorted(graph.items()):
        low = _package(importer)
        if low not in layers:
            continue
        for imported, wheres in sorted(targets.items()):
            high = _package(imported)
            if high != low and layers.get(high, len(layers) + 1) > layers[low]:
                found.append(f"{importer} (layer {layers[low]}) -> {imported} (layer {layers.get(high)})\n    "
                             + "\n    ".join(wheres))
    return found


def test_no_import_goes_up_a_layer():
    graph = import_graph(PACKAGE_ROOT)
    assert graph["cluster.serve.router"], "the walk found the package's imports"
    found = upward_imports(graph, LAYERS)
    assert not found, "imports against the layers:\n" + "\n".join(found)


@pytest.mark.parametrize("files, want", [
    ({"pkg/__init__.py": "", "pkg/low/__init__.py": "", "pkg/low/a.py": "def f():\n    from pkg.high import b\n",
      "pkg/high/__init__.py": "", "pkg/high/b.py": ""}, ["pkg.low.a (layer 0) -> pkg.high.b"]),
    ({"pkg/__init__.py": "", "pkg/high/__init__.py": "", "pkg/high/b.py": "from pkg.low import a\n",
      "pkg/low/__init__.py": "", "pkg/low/a.py": ""}, []),
    ({"pkg/__init__.py": "", "pkg/other/__init__.py": "", "pkg/other/c.py": ""},
     ["package 'other' has no layer"]),
], ids=["upward-in-a-function", "downward", "unplaced-package"])
def test_the_rule_finds_upward_imports(tmp_path: Path, files: dict[str, str], want: list[str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = upward_imports(import_graph(tmp_path / "pkg"), {"pkg": 0, "low": 0, "high": 1})
    assert [line.split("\n")[0][:len(w)] for line, w in zip(found, want)] == want and len(found) == len(want)
