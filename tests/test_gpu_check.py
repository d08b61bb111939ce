"""The GPU check runs end to end before any GPU sees it: `gpu_check.sh --dry-run` on the CPU, under the Triton
interpreter with tiny shapes, every section reporting ok in one JSON. And the arithmetic that sizes its full-depth
section for the GPU at hand, by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.checkpoint.presets import preset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the check's modules import each other by their bare names

import gpu_full_depth  # noqa: E402

SECTIONS = {"ceilings", "kernel_tests", "moe_kernel", "paged_attention", "glue_kernels", "engine_mini",
            "engine_8x7b", "engine_piecewise", "tiny_vs_cpu", "serve_api", "engine_8x7b_full"}
GiB = 2**30


@pytest.mark.e2e  # the whole check in subprocesses: engines, a server, benchmarks, kernel tests
def test_gpu_check_dry_run(tmp_path: Path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "MOE_CLUSTER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900)
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
    assert engine["eager_vs_graphs"]["async_equal_in_series"] == engine["eager_vs_graphs"]["sequences"]
    assert engine["in_series"]["output_tokens"] == engine["engine"]["output_tokens"]
    assert engine["in_series"]["ahead_over_in_series"] > 0
    assert results["sections"]["tiny_vs_cpu"]["sequences_equal"] == results["sections"]["tiny_vs_cpu"]["sequences"]
    assert len(results["sections"]["glue_kernels"]["rows"]) > 0

    api = results["sections"]["serve_api"]
    assert api["streams_whole"] == api["requests"] > 0
    assert api["api"]["output_tokens"] == api["engine"]["output_tokens"] > 0
    assert api["api"]["tokens_per_s"] > 0 and api["api"]["ttft_p50_ms"] is not None and api["api_over_engine"] > 0
    assert api["server_start_s"] > 0

    full = results["sections"]["engine_8x7b_full"]
    assert full["layers"] == "1/2" and full["pretend_free_memory"] is True  # the dry run's memory holds one layer
    step = full["step_time"]
    assert step["decode_steps"] > 0 and step["step_ms"] > 0 and step["goal_met"] is None
    assert step["scaled_step_ms"] == pytest.approx(2 * step["step_ms"], abs=1e-2) and "scaled" in full["headline"]
    assert set(full["concurrency"]) == {"1", "2", "4"}
    for run in full["concurrency"].values():
        assert run["output_tokens"] > 0 and run["tokens_per_s"] > 0 and run["ttft_p50_ms"] is not None
        assert run["itl_p50_ms"] is not None and run["roofline"][-1]["kind"] == "all"


@pytest.mark.e2e  # another interpreter
def test_a_section_not_started_within_the_budget_is_recorded_as_skipped(tmp_path: Path):
    out = tmp_path / "gc.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--budget-s", "0",
                           "--only", "ceilings", "paged_attention", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    sections = json.loads(out.read_text())["sections"]
    assert done.returncode == 1, done.stdout + done.stderr
    assert [(name, r["status"]) for name, r in sections.items()] == [("ceilings", "skipped"),
                                                                     ("paged_attention", "skipped")]


def _one_layer_of_8x7b() -> int:
    h, f, e = 4096, 14336, 8
    attention = h * 4096 + 2 * h * 1024 + 4096 * h  # q, k, v, o
    return 2 * (e * 3 * h * f + attention + h * e + 2 * h)  # bf16: experts, attention, router, two norms


def test_an_h100_holds_the_layers_of_mixtral_8x7b_that_fit_beside_the_kv_cache_and_an_h200_all_32():
    full, kv_tokens = preset("mixtral-8x7b"), 40_000
    fixed = 2 * (2 * 32000 * 4096 + 4096)  # embeddings, lm_head, final norm
    per_layer = _one_layer_of_8x7b() + kv_tokens * 2 * 8 * 128 * 2  # + its K and V for every token
    free = 79 * GiB
    expected = (free - gpu_full_depth.HEADROOM_BYTES - fixed) // per_layer
    assert 20 <= expected < 32
    assert gpu_full_depth.layers_that_fit(full, free, kv_tokens, 2, gpu_full_depth.HEADROOM_BYTES) == expected
    assert gpu_full_depth.layers_that_fit(full, 139 * GiB, kv_tokens, 2, gpu_full_depth.HEADROOM_BYTES) == 32
    assert gpu_full_depth.layers_that_fit(full, GiB, kv_tokens, 2, 0) == 0


def test_the_kv_cache_holds_the_longest_sequences_of_the_busiest_workload_in_whole_blocks():
    requests = [([0] * 20, 10), ([0] * 5, 5), ([0] * 40, 1)]  # 30, 10, 41 tokens: 2, 1, 3 blocks of 16
    assert gpu_full_depth.kv_tokens_needed([(requests, 1)]) == 3 * 16 + 16  # the longest, and the scratch block
    assert gpu_full_depth.kv_tokens_needed([(requests, 1), (requests, 2)]) == (3 + 2) * 16 + 16
