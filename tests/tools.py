"""Programs some tests run (kubectl, Debian's servers): found on PATH, or the test skips, except in CI, where a
missing one is a failure (.ci/run installs what it must)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml


def required_tool(name: str, what_for: str) -> str:
    """`name`'s path on PATH; without it the test skips, or fails in CI."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"no {name}: CI must provide it {what_for}", pytrace=False)
        pytest.skip(f"no {name} {what_for} (in CI this is a failure)")
    return path


def kustomize(path: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize <path>` prints (what `kubectl apply -k` would apply)."""
    kubectl = required_tool("kubectl", "to build the kustomizations")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
