"""The core (model, engine, kernels, experts, checkpoints) imports without the serving stack: the GPU check runs it
on a machine that has torch and triton but no Ray, pydantic, starlette or mistral-common."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import cluster

pytestmark = pytest.mark.e2e  # fresh interpreters

SERVING_STACK = ("ray", "pydantic", "starlette", "uvicorn", "mistral_common")
CORE = ("cluster.model", "cluster.engine", "cluster.kernels", "cluster.moe", "cluster.checkpoint", "cluster.attention")

# Runs in a fresh interpreter: an import hook refuses the serving stack, then every core module is imported.
_PROBE = """
import importlib, importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("refused: " + name)
sys.meta_path.insert(0, Refuse())
for module in {modules!r}:
    importlib.import_module(module)
print("imported", len({modules!r}))
"""


def _core_modules() -> list[str]:
    root = Path(cluster.__file__).parent
    names = []
    for package in CORE:
        path = root / package.split(".", 1)[1]
        if not path.is_dir():
            continue
        names.append(package)
        names += [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(path)]) if not m.ispkg]
    return names


def test_core_imports_without_the_serving_stack():
    modules = _core_modules()
    assert "cluster.engine.engine" in modules and "cluster.moe.triton_backend" in modules
    probe = _PROBE.format(blocked=SERVING_STACK, modules=modules)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(modules)}" in done.stdout


def test_the_probe_refuses_the_serving_stack():
    """The hook itself works: importing the Ray-facing unit module fails under it."""
    probe = _PROBE.format(blocked=SERVING_STACK, modules=["cluster.serve.unit"])
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "refused: " in done.stderr
