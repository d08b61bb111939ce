"""benchmarks/moe_kernel.py's dry run (tiny stand-ins of both Mixtral models under the CPU interpreter): every model,
case and M gets a row that matches the torch backend, with its share of the roofline and its ratio to the torch
backend's time computed from the row's own measurements."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import moe_kernel  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU (there: the run)")
def test_dry_run_has_a_row_per_model_case_and_m_with_roofline_and_torch_ratio() -> None:
    out = moe_kernel.run(dry_run=True)
    assert out["ok"] and out["passed"]
    assert [(c["model"], c["case"]) for c in out["cases"]] == [
        (model, case) for model, _, _ in moe_kernel.DRY.models for case in ("1 local", "8 local")]
    assert {(c["hidden"], c["ffn"]) for c in out["cases"]} == {(d, f) for _, d, f in moe_kernel.DRY.models}
    copy_bw, peak = out["copy_bytes_per_s"], out["bf16_flops_per_s"]
    for c in out["cases"]:
        assert [r["M"] for r in c["rows"]] == list(moe_kernel.DRY.tokens)
        for r in c["rows"]:
            roof_ms = 1e3 * max(r["bytes"] / copy_bw, r["flops"] / peak)
            assert r["roof_pct"] == pytest.approx(100 * roof_ms / r["ms"])
            assert r["x_torch"] == pytest.approx(r["ms"] / r["torch_ms"])
            assert r["check"] and r["rel_err"] < moe_kernel.CHECK_TOL
    assert all(f"{model} 8 local" in out["headline"] for model, _, _ in moe_kernel.DRY.models)


def test_the_gpu_run_covers_both_models_at_every_m() -> None:
    assert moe_kernel.GPU.models == (("8x22B", 6144, 16384), ("8x7B", 4096, 14336))
    assert moe_kernel.GPU.tokens == (1, 8, 64, 256, 512, 1024, 4096)
