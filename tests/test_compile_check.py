"""benchmarks/compile_check.py for sm_90 with the installed Triton, on a few variants: every kernel compiles ahead of
time without spills and fits in shared memory, and the launchers ask for no more variants than they should (step
metadata at any alignment or table width, or router weights at any offset, must not compile new ones mid-serving).

It runs in a subprocess: the check needs compiled kernels, and this process defines them under the interpreter when
there is no GPU (conftest sets TRITON_INTERPRET before any kernel is defined).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_decode_kernel", "_reduce_kernel", "_prefill_kernel", "_store_kv_kernel", "_gate_up_kernel",
           "_down_kernel", "_quantize_rows_kernel", "_align_kernel", "_add_rms_norm_kernel", "_rotary_kernel",
           "_route_kernel"}


def _cuda_compiler_missing() -> str | None:
    """Why this Triton cannot compile for CUDA without a GPU, or None if it can: it needs its NVIDIA backend and the
    ptxas it bundles (builds without them exist, e.g. for other vendors or the CPU only)."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"this Triton has no NVIDIA backend ({exc}), so it cannot compile for CUDA"
    if "nvidia" not in backends:
        return "this Triton has no NVIDIA backend registered, so it cannot compile for CUDA"
    try:
        path = get_ptxas(90).path
    except Exception as exc:  # the knob raises when the bundled binary is absent
        return f"this Triton ships no ptxas for sm_90 ({exc}), so nothing can be compiled to a cubin here"
    if not os.access(path, os.X_OK):
        return f"this Triton's ptxas ({path}) is not executable, so nothing can be compiled to a cubin here"
    return None


def _run(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert not row["problems"], row
        assert row["registers"] and row["registers"] > 0 and row["shared"] is not None, row
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
    return rows


@pytest.mark.e2e  # the compile check's own process, end to end
def test_compile_check_sm90(tmp_path: Path) -> None:
    missing = _cuda_compiler_missing()
    if missing:
        pytest.skip(missing)
    rows = _run(tmp_path, "--quick", "--jobs", "2")
    assert {r["kernel"] for r in rows} == KERNELS, sorted(r["kernel"] for r in rows)
    per_kernel = Counter(r["kernel"] for r in rows)
    # --quick: bf16, Dh 128, G 6, splits 1 and 3; each launch is made at several metadata layouts (table width 4096,
    # 7, 1; views at int32 offsets 0, 1, 3), prefill at four (first_seq, num_seqs) shapes, the KV write with aligned
    # and unaligned slots, the MoE with aligned and unaligned router weights: none of these may add a variant.
    assert per_kernel["_decode_kernel"] == 2, per_kernel
    assert per_kernel["_reduce_kernel"] == 1, per_kernel
    assert per_kernel["_prefill_kernel"] == 1, per_kernel
    assert per_kernel["_store_kv_kernel"] == 1, per_kernel
    # M <= 32: one config, with bf16 weights, FP8 ones widened (W8A16) and FP8 dots (W8A8, which quantizes x and h:
    # one variant for both)
    assert per_kernel["_gate_up_kernel"] == per_kernel["_down_kernel"] == 3, per_kernel
    assert per_kernel["_quantize_rows_kernel"] == 1, per_kernel
    assert per_kernel["_align_kernel"] == 2, per_kernel  # int64 router ids and int32 channel ids
    # The glue at T = 1, 5 and 64, positions at int32 offsets 0, 1, 3, counts in two layers' rows: none adds a
    # variant; the residual and the count are constexprs.
    assert per_kernel["_add_rms_norm_kernel"] == 2, per_kernel  # with and without a residual
    assert per_kernel["_rotary_kernel"] == 1, per_kernel
    assert per_kernel["_route_kernel"] == 2, per_kernel  # counted and not


@pytest.mark.e2e  # the compile check's own process, end to end
def test_compile_check_fp32_attention_does_not_spill(tmp_path: Path) -> None:
    """Exact fp32 dots run on FMA units with whole tiles in registers: the variant that spilled with the bf16 tiles
    (one query head per kv head, Dh 128, an odd split count) compiles without spills."""
    missing = _cuda_compiler_missing()
    if missing:
        pytest.skip(missing)
    rows = _run(tmp_path, "--kernels", "attention", "--dtypes", "fp32", "--head-dims", "128", "--groups", "1",
                "--splits", "1,3", "--jobs", "2")
    assert Counter(r["kernel"] for r in rows) == {"_decode_kernel": 2, "_reduce_kernel": 1, "_prefill_kernel": 1,
                                                   "_store_kv_kernel": 1}


@pytest.mark.e2e  # the compile check's own process, end to end
def test_compile_check_fp32_moe_does_not_spill(tmp_path: Path) -> None:
    """fp32 takes its own default MoE tiles past M = 32 (the 16-bit ones spill in fp32): every bucket compiles
    without spills."""
    missing = _cuda_compiler_missing()
    if missing:
        pytest.skip(missing)
    rows = _run(tmp_path, "--kernels", "moe", "--dtypes", "fp32", "--jobs", "2")
    # M <= 32, <= 256, more; each with fp32 weights, FP8 ones widened (their K tiles halved) and FP8 dots
    assert Counter(r["kernel"] for r in rows) == {"_gate_up_kernel": 9, "_down_kernel": 9, "_quantize_rows_kernel": 1}


@pytest.mark.e2e  # the compile check's own process, end to end
@pytest.mark.parametrize("arch, mode", [(80, "w8a16"), (89, "w8a8")])
def test_compile_check_fp8_experts_on_the_first_gpus_of_their_mode(tmp_path: Path, arch: int, mode: str) -> None:
    """W8A16 widens FP8 bytes by integer ops, so it compiles for Ampere (sm_80), which has no e4m3 type; W8A8's FP8
    dots compile for Ada (sm_89), the first GPUs that multiply FP8."""
    missing = _cuda_compiler_missing()
    if missing:
        pytest.skip(missing)
    rows = _run(tmp_path, "--arch", str(arch), "--kernels", "moe", "--dtypes", "bf16,fp16", "--fp8", mode,
                "--moe-max-tokens", "300", "--jobs", "2")
    scaled = [r for r in rows if f" {mode} " in r["case"]]
    assert {r["kernel"] for r in scaled} >= {"_gate_up_kernel", "_down_kernel"}, rows


@pytest.mark.e2e  # the compile check's own process, end to end
def test_compile_check_head_dim_below_16(tmp_path: Path) -> None:
    """tl.dot needs K >= 16: a head dim of 8 (padded to 16 and masked) compiles."""
    missing = _cuda_compiler_missing()
    if missing:
        pytest.skip(missing)
    rows = _run(tmp_path, "--kernels", "attention", "--dtypes", "bf16", "--head-dims", "8", "--groups", "2",
                "--splits", "1")
    assert {r["kernel"] for r in rows} == {"_decode_kernel", "_prefill_kernel", "_store_kv_kernel"}


def test_decode_split_counts_cover_every_choice() -> None:
    """The check compiles `decode_split_counts`: it must hold every count `decode_splits` picks, for any batch and
    table width up to the widest."""
    from cluster.kernels.paged_attention import decode_split_counts, decode_splits

    for kv_heads, sms, widest in ((8, 132, 300), (2, 20, 40), (8, 132, 3), (1, 1, 1)):
        seen = {decode_splits(b, kv_heads, w, 16, sms) for b in range(1, 300) for w in range(1, widest + 1)}
        assert seen == set(decode_split_counts(kv_heads, widest, 16, sms)), (kv_heads, sms, widest)
