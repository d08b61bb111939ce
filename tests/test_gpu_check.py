"""The GPU check runs end to end before any GPU sees it: `gpu_check.sh --dry-run` on the CPU, under the Triton
interpreter with tiny shapes, every section reporting ok in one JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # the whole check in subprocesses: engines, benchmarks, kernel tests

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"ceilings", "kernel_tests", "moe_kernel", "paged_attention", "engine_mini", "engine_8x7b", "engine_piecewise",
            "tiny_vs_cpu"}


def test_gpu_check_dry_run(tmp_path: Path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "MOE_CLUSTER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    failed = {name: r.get("error") or r.get("headline") for name, r in results["sections"].items()
              if r["status"] != "ok"}
    assert done.returncode == 0 and not failed, (failed, done.stdout[-4000:])
    assert set(results["sections"]) == SECTIONS
    assert results["environment"]["dry_run"] is True
    assert (tmp_path / "out" / "gpu_check.log").read_text().strip().endswith("gpu_check.json")
    engine = results["sections"]["engine_mini"]
    assert engine["eager_vs_graphs"]["sequences_equal"] == engine["eager_vs_graphs"]["sequences"] > 0
    assert engine["engine"]["output_tokens"] > 0 and engine["bound"]["output_tokens"] > 0
    assert results["sections"]["tiny_vs_cpu"]["sequences_equal"] == results["sections"]["tiny_vs_cpu"]["sequences"]
