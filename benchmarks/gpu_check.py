"""The GPU check: everything the first minutes on a GPU must prove, in one run that writes one JSON.

    python benchmarks/gpu_check.py [--dry-run] [--out gpu_check.json] [--only SECTION ...] [--budget-s S]

Sections, in this order (correctness first, so a run cut short still says whether the GPU path computes the right
thing), each timed and recorded on its own (a crash is recorded with its traceback, a missed check as "failed"; the
rest still run):
  ceilings         device-to-device copy bandwidth and bf16 matmul rate, measured here (the denominators below)
  kernel_tests     the kernel (FP8 too), attention and graph test files under pytest, on this device
  tiny_vs_cpu      greedy tokens on `tiny`, this device against CPU fp32
  moe_kernel       fused MoE on Mixtral 8x7B and 8x22B expert shapes: % of the roofline and the torch time per M
  paged_attention  paged decode attention at batch 64 x 4K context against the HBM bound
  glue_kernels     the fused decode glue (residual add + RMSNorm, rotary, router top-k) against the torch ops it
                   replaces at 8x7B decode sizes: time, bytes over the copy bandwidth, fused/torch
  engine_mini      the engine (Triton MoE, Triton attention, CUDA graphs) on `mini`: tok/s at concurrency 64,
                   the forward-only bound, launches per decode step, eager and graph outputs equal
  engine_piecewise `mini` with its experts on 2 shard workers behind the expert-parallel executor, as a serving
                   unit drives them: decode graphs captured piecewise around each layer's experts
  engine_8x7b      the same as engine_mini on Mixtral 8x7B's shapes with 2 layers, random weights made on the device
  serve_api        `moe-cluster serve --no-ray` on `mini` (random weights) in a subprocess under concurrent streaming
                   chat requests, against the engine alone on the same workload: API tokens/s >= 0.9x the engine's
                   (benchmarks/serve_api.py; needs the carried wheels, see gpu_check.sh)
  engine_8x7b_full Mixtral 8x7B's shape at full depth, or the layers that fit beside the KV cache (said as N/32),
                   random weights made on the device: batch 8, 32 in / 128 out, ms per decode step (goal <= 20 on an
                   H200; scaled to 32 layers, labelled so, when fewer fit), then tokens/s, TTFT, ITL p50/p99 and the
                   roofline table at concurrency 1, 8 and 64 (benchmarks/gpu_full_depth.py)

--budget-s bounds the whole run (default: DEFAULT_BUDGET_S on a GPU, none in a dry run): a section not started by
then is recorded as "skipped", and the long sections start no new workload past it.

Needs torch, triton, numpy, safetensors and pytest; serve_api also the server's packages (pydantic, starlette,
uvicorn, httptools, mistral-common and theirs: benchmarks/gpu_wheels.sh lists them) and httpx. `--dry-run` runs
every section on the CPU with the Triton interpreter and tiny shapes, so the script is known to work before a GPU
sees it (tests/test_gpu_check.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_align.py", "tests/test_triton_attention.py",
                "tests/test_paged_cache.py", "tests/test_cuda_graphs.py", "tests/test_kernel_hazards.py",
                "tests/test_fp8_kernels.py", "tests/test_glue_kernels.py"]


def environment(dry_run: bool) -> dict:
    import torch
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "dry_run": dry_run}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1))
    else:
        info["device"] = "cpu (Triton interpreter)"
    return info


def ceilings(dry_run: bool, deadline: float) -> dict:
    from ceilings import measure_ceilings

    return measure_ceilings(dry_run)


def kernel_tests(dry_run: bool, deadline: float) -> dict:
    files = [f for f in KERNEL_TESTS if (ROOT / f).is_file()]
    # The dry run only collects: the suite runs these files under the interpreter anyway.
    # no:warnings: pyproject's warning filters name pydantic, which the GPU machine lacks.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
               *(["--collect-only"] if dry_run else []), *files]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=max(1.0, min(300.0, deadline - time.monotonic())))
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    result = {"files": files, "returncode": done.returncode, "summary": tail, "headline": tail,
              "passed": done.returncode == 0}
    if done.returncode != 0:
        result["output_tail"] = (done.stdout + done.stderr)[-6000:]
    return result


def moe_kernel(dry_run: bool, deadline: float) -> dict:
    import moe_kernel as bench

    return bench.run(dry_run)


def paged_attention(dry_run: bool, deadline: float) -> dict:
    import paged_attention as bench

    return bench.run(dry_run)


def glue_kernels(dry_run: bool, deadline: float) -> dict:
    import glue_kernels as bench

    return bench.run(dry_run)


def engine_mini(dry_run: bool, deadline: float) -> dict:
    import gpu_engine

    return gpu_engine.run("tiny" if dry_run else "mini", dry_run)


def engine_8x7b(dry_run: bool, deadline: float) -> dict:
    import gpu_engine

    return gpu_engine.run("tiny" if dry_run else "mixtral-8x7b-2layers", dry_run)


def engine_piecewise(dry_run: bool, deadline: float) -> dict:
    import gpu_engine

    return gpu_engine.run("tiny" if dry_run else "mini", dry_run, shards=2)


def tiny_vs_cpu(dry_run: bool, deadline: float) -> dict:
    import gpu_engine

    return gpu_engine.compare_with_cpu(dry_run)


def serve_api(dry_run: bool, deadline: float) -> dict:
    import serve_api as bench

    return bench.run(dry_run, deadline)


def engine_8x7b_full(dry_run: bool, deadline: float) -> dict:
    import gpu_full_depth

    return gpu_full_depth.run(dry_run, deadline)


# Correctness first: a run cut short by its time limit still says whether the GPU path computes the right thing.
# Each takes (dry_run, the run's deadline on time.monotonic()).
SECTIONS: dict[str, Callable[[bool, float], dict]] = {
    "ceilings": ceilings, "kernel_tests": kernel_tests, "tiny_vs_cpu": tiny_vs_cpu, "moe_kernel": moe_kernel,
    "paged_attention": paged_attention, "glue_kernels": glue_kernels, "engine_mini": engine_mini,
    "engine_piecewise": engine_piecewise, "engine_8x7b": engine_8x7b, "serve_api": serve_api,
    "engine_8x7b_full": engine_8x7b_full,
}
# The whole run on a GPU, within the 8 minutes one device call may take (the rest: start-up and the wheels' install).
DEFAULT_BUDGET_S = 420.0


def run_section(name: str, dry_run: bool, deadline: float) -> dict:
    if time.monotonic() > deadline:
        return {"status": "skipped", "error": "the run's --budget-s was spent before it started", "seconds": 0.0}
    t0 = time.perf_counter()
    try:
        measured = SECTIONS[name](dry_run, deadline)  # a section that ran but missed its check says "passed": False
        record = {"status": "ok" if measured.get("passed", True) else "failed", **measured}
    except Exception as e:  # a crash is a finding: record it and go on to the next section
        record = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-6000:]}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument("--budget-s", type=float, help=f"seconds for the whole run (default: {DEFAULT_BUDGET_S:g} "
                                                       f"on a GPU, none in a dry run)")
    args = parser.parse_args(argv)
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else DEFAULT_BUDGET_S)
    deadline = time.monotonic() + budget
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    results = {"environment": environment(args.dry_run), "sections": {}}
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        results["sections"][name] = run_section(name, args.dry_run, deadline)
        record = results["sections"][name]
        print(f"   {record['status']} in {record['seconds']}s" + (f": {record['error']}" if "error" in record else ""),
              flush=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")  # partial results survive a timeout

    print(f"\n{'section':<18}{'status':<8}{'s':>7}  headline")
    for name, record in results["sections"].items():
        print(f"{name:<18}{record['status']:<8}{record['seconds']:>7}  {record.get('headline', '')}")
    print(f"\nwrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
