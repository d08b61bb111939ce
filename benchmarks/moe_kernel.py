"""The fused-MoE Triton backend on Mixtral 8x22B and 8x7B expert shapes, against ceilings and the torch backend
measured in the same run.

Legend: M = tokens, K = experts per token (2), D = hidden (8x22B: 6144, 8x7B: 4096), F = ffn (16384, 14336),
E = local experts, P = M*K pairs.
Per model, two shards of one layer, bf16: "1 local" holds expert 0 of 8 (expert parallel over eight GPUs; every
token routes to it and to one expert held elsewhere, so it runs M rows and drops M pairs) and "8 local" holds all
eight (random Mixtral-like top-2 routing). Per model, case and M:
  ms          median of `triton.testing.do_bench` (L2 flushed before each call), rotating among a few input sets
  bytes       the weights of the local experts the routing touches + x read + the output written (bf16); the
              kernels' own scratch traffic (h [C, F] bf16 and y [P, D] fp32, each written and read) is `scratch_bytes`
  flops       2 * 3 * D * F per local pair
  bw_pct      bytes / ms against the device-to-device copy bandwidth measured here (bytes read + written)
  peak_pct    flops / ms against the median 8192^3 bf16 torch.matmul measured here
  roof_pct    the roofline's time, max(bytes / copy bandwidth, flops / matmul rate), over ms: 100 = on the roofline
  x_torch     ms / torch_ms: below 1, the Triton backend is the faster
  rel_err     ||triton - torch backend|| / ||torch backend|| in fp32 (check: below CHECK_TOL)
  torch_ms, align_ms, align_torch_ms: the torch backend, and the Triton align kernel against the torch align
Each case starts with `TritonMoEBackend.warm_up` (every kernel compiled once, timed as `warm_up_s`).

    python benchmarks/moe_kernel.py [--out results.json]    # on a GPU
    python benchmarks/moe_kernel.py --dry-run               # tiny shapes under the CPU interpreter, in seconds
A GPU check script can import it (repository root on sys.path) and call `run(dry_run=False) -> dict` (the dry
run and the GPU run each in a process of their own: Triton fixes interpreter or compiler at kernel import).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ceilings import copy_bandwidth, matmul_peak, median_timer  # noqa: E402

NUM_EXPERTS, TOP_K = 8, 2
CHECK_TOL = 2e-2  # bf16 relative error, Triton vs the torch backend
INPUT_SETS = 3  # x at M = 4096 is 50 MB, inside the 60 MB L2: rotate sets (do_bench also flushes L2)


@dataclass(frozen=True)
class Plan:
    """What one run measures, and where."""

    device: str
    models: tuple[tuple[str, int, int], ...]  # (name, hidden D, ffn F)
    tokens: tuple[int, ...]
    copy_bytes: int  # size of the bandwidth probe's copy
    matmul_n: int  # side of the peak probe's square matmul


GPU = Plan("cuda", (("8x22B", 6144, 16384), ("8x7B", 4096, 14336)), (1, 8, 64, 256, 512, 1024, 4096), 1 << 30, 8192)
# Stand-ins: the first fills the interpreter's tiles, the second does not (the kernels' masked path).
DRY = Plan("cpu", (("8x22B", 64, 128), ("8x7B", 48, 112)), (1, 16, 64), 16 << 20, 256)


def make_experts(d: int, f: int, plan: Plan, g: torch.Generator):
    """All eight experts of one layer, bf16, random (scaled so activations stay O(1))."""
    from cluster.moe.weights import ExpertWeights

    e = NUM_EXPERTS
    w13 = torch.empty(e, 2 * f, d, dtype=torch.bfloat16, device=plan.device)  # [E, 2F, D]
    w2 = torch.empty(e, d, f, dtype=torch.bfloat16, device=plan.device)  # [E, D, F]
    for w, fan_in in ((w13, d), (w2, f)):
        for i in range(e):  # per expert: an fp32 randn of all eight at once would be 9.7 GB
            w[i].copy_(torch.randn(w.shape[1:], generator=g, device=plan.device).mul_(fan_in**-0.5))
    return ExpertWeights(w13, w2, tuple(range(e)))


def make_inputs(case: str, m: int, d: int, plan: Plan, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """x [M, D] bf16, topk_ids [M, K] int64, topk_weights [M, K] fp32 (the router's), random."""
    x = torch.randn(m, d, generator=g, device=plan.device).to(torch.bfloat16)
    logits = torch.randn(m, NUM_EXPERTS, generator=g, device=plan.device)
    if case == "1 local":
        logits[:, 0] = float("inf")  # expert 0 (the local one) and the best of the other seven
    _, ids = logits.topk(TOP_K, dim=-1)
    tw = torch.softmax(torch.randn(m, TOP_K, generator=g, device=plan.device), dim=-1)
    return x, ids, tw


def run_m(case: str, weights, m: int, plan: Plan, bench, copy_bw: float, peak: float,
          g: torch.Generator) -> dict:
    from cluster.kernels.align import align_pairs_torch, align_pairs_triton
    from cluster.moe.torch_backend import TorchMoEBackend
    from cluster.moe.triton_backend import TritonMoEBackend

    triton_moe, torch_moe = TritonMoEBackend(), TorchMoEBackend()
    num_local, f2, d = weights.w13.shape
    sets = [make_inputs(case, m, d, plan, g) for _ in range(INPUT_SETS)]
    emap = weights.expert_map(NUM_EXPERTS)

    layer, torch_layer = triton_moe.prepare(weights), torch_moe.prepare(weights)
    x, ids, tw = sets[0]
    want = torch_moe(x, torch_layer, ids, tw, NUM_EXPERTS).float()
    got = triton_moe(x, layer, ids, tw, NUM_EXPERTS).float()
    rel_err = ((got - want).norm() / want.norm()).item()

    def rotating(fn):
        cycle = itertools.cycle(sets)
        return lambda: fn(*next(cycle))

    ms = bench(rotating(lambda x, ids, tw: triton_moe(x, layer, ids, tw, NUM_EXPERTS)))
    torch_ms = bench(rotating(lambda x, ids, tw: torch_moe(x, torch_layer, ids, tw, NUM_EXPERTS)))
    block_m = triton_moe.config(m, weights).block_m
    align_ms = bench(rotating(lambda x, ids, tw: align_pairs_triton(ids, emap, num_local, block_m)), rep=5)
    align_torch_ms = bench(rotating(lambda x, ids, tw: align_pairs_torch(ids, emap, num_local, block_m)), rep=5)

    # Averages over the input sets: what the timed calls did.
    local = [emap[ids.flatten()] for _, ids, _ in sets]  # [P] local expert or -1, per set
    touched = statistics.mean(int(torch.unique(loc[loc >= 0]).numel()) for loc in local)
    pairs = statistics.mean(int((loc >= 0).sum()) for loc in local)
    per_expert = weights.nbytes // num_local
    nbytes = touched * per_expert + 2 * m * d * x.element_size()  # weights touched + x in + out
    padded = statistics.mean(int(align_pairs_torch(ids, emap, num_local, block_m).total) for _, ids, _ in sets)
    scratch = 2 * padded * (f2 // 2) * x.element_size() + 2 * m * TOP_K * d * 4  # h and y, written + read
    flops = 2 * 3 * d * (f2 // 2) * pairs
    roof_ms = 1e3 * max(nbytes / copy_bw, flops / peak)
    return {"M": m, "ms": ms, "bytes": nbytes, "scratch_bytes": scratch, "flops": flops,
            "bw_pct": 100 * nbytes / (ms * 1e-3) / copy_bw, "peak_pct": 100 * flops / (ms * 1e-3) / peak,
            "roof_pct": 100 * roof_ms / ms, "x_torch": ms / torch_ms,
            "experts_touched": touched, "local_pairs": pairs, "rel_err": rel_err, "check": rel_err < CHECK_TOL,
            "torch_ms": torch_ms, "align_ms": align_ms, "align_torch_ms": align_torch_ms,
            "config": triton_moe.config(m, weights).to_json()}


def format_row(model: str, case: str, r: dict) -> str:
    check = "ok" if r["check"] else "WRONG"
    return (f"{model:>6} {case:>8} {r['M']:>5} {r['ms']:>9.3f} {r['bytes'] / 1e9:>7.3f} {r['flops'] / 1e9:>8.1f} "
            f"{r['bw_pct']:>6.1f} {r['peak_pct']:>7.1f} {r['roof_pct']:>6.1f} {r['x_torch']:>7.2f} "
            f"{r['rel_err']:>8.1e} {check:>5} {r['torch_ms']:>9.3f} {r['align_ms']:>8.4f} {r['align_torch_ms']:>9.4f}")


HEADER = (f"{'model':>6} {'case':>8} {'M':>5} {'ms':>9} {'GB':>7} {'GFLOP':>8} {'bw %':>6} {'peak %':>7} "
          f"{'roof %':>6} {'x torch':>7} {'rel err':>8} {'check':>5} {'torch ms':>9} {'align ms':>8} {'align(t)':>9}")


def _check_mode(dry_run: bool) -> None:
    """Triton picks interpreter or compiler when a kernel is defined (imported), once per process: the dry run sets
    the interpreter before that, and each mode refuses kernels defined in the other (run each in its own process)."""
    if dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise RuntimeError("the moe_kernel benchmark needs a CUDA GPU (or --dry-run)")
    if (os.environ.get("TRITON_INTERPRET") == "1") != dry_run or _kernels_interpreted() != dry_run:
        raise RuntimeError(f"{'the dry run needs' if dry_run else 'a GPU run cannot have'} the Triton "
                           "interpreter (TRITON_INTERPRET=1, before the kernels are imported); use a fresh process")


def _kernels_interpreted() -> bool:
    from cluster.kernels import fused_moe

    return type(fused_moe._down_kernel).__name__ == "InterpretedFunction"


def run(dry_run: bool, tokens: tuple[int, ...] | None = None) -> dict:
    """Measure everything; -> the results (see the module docstring). `dry_run`: tiny shapes, CPU interpreter."""
    plan = DRY if dry_run else GPU
    _check_mode(dry_run)
    from cluster.kernels.tuning import device_name, triton_version
    from cluster.moe.triton_backend import TritonMoEBackend

    start = time.perf_counter()
    tokens = tuple(tokens or plan.tokens)
    bench = median_timer(torch.device(plan.device), rep=40)  # few repeats: the whole GPU run stays short
    device = torch.device(plan.device)
    copy_bw, peak = copy_bandwidth(bench, device, plan.copy_bytes), matmul_peak(bench, device, plan.matmul_n)
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu (interpreter)"
    print(f"{name}, triton {triton_version()}: copy {copy_bw / 1e9:.0f} GB/s (read + write), "
          f"bf16 matmul {peak / 1e12:.1f} TFLOP/s; top-{TOP_K}; "
          + ", ".join(f"{model} D={d} F={f}" for model, d, f in plan.models), flush=True)
    print(HEADER, flush=True)

    g = torch.Generator(device=plan.device).manual_seed(0)
    cases = []
    for model, d, f in plan.models:
        experts = make_experts(d, f, plan, g)
        one = type(experts)(experts.w13[:1], experts.w2[:1], (0,))  # a view: expert 0 alone
        for case, weights in (("1 local", one), ("8 local", experts)):
            t0 = time.perf_counter()
            backend = TritonMoEBackend()
            backend.warm_up(backend.prepare(weights), max(tokens), top_k=TOP_K, num_experts=NUM_EXPERTS)
            warm_s = time.perf_counter() - t0
            rows = []
            for m in tokens:
                rows.append(run_m(case, weights, m, plan, bench, copy_bw, peak, g))
                print(format_row(model, case, rows[-1]), flush=True)
            cases.append({"model": model, "hidden": d, "ffn": f, "case": case,
                          "local_experts": weights.w13.shape[0], "warm_up_s": warm_s, "rows": rows})
        del experts, one
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    ok = all(r["check"] for c in cases for r in c["rows"])
    wall = time.perf_counter() - start
    print(f"{'all rows match' if ok else 'MISMATCH against'} the torch backend; {wall:.1f} s", flush=True)
    return {"device": name, "config_device": device_name(plan.device), "triton": triton_version(),
            "torch": torch.__version__, "dry_run": dry_run, "models": [list(m) for m in plan.models],
            "top_k": TOP_K, "dtype": "bf16", "copy_bytes_per_s": copy_bw, "bf16_flops_per_s": peak, "cases": cases,
            "ok": ok, "passed": ok, "headline": headline(cases, ok), "wall_s": wall}


def headline(cases: list[dict], ok: bool) -> str:
    """One line per model and case: the smallest M's share of bandwidth, the largest M's share of peak, the lowest
    share of the roofline (at which M) and the largest ratio to the torch backend's time (at which M)."""
    parts = []
    for c in cases:
        lo, hi = c["rows"][0], c["rows"][-1]
        worst = min(c["rows"], key=lambda r: r["roof_pct"])
        slow = max(c["rows"], key=lambda r: r["x_torch"])
        parts.append(f"{c['model']} {c['case']}: M={lo['M']} {lo['bw_pct']:.0f}% HBM, M={hi['M']} "
                     f"{hi['peak_pct']:.0f}% peak, roofline >= {worst['roof_pct']:.0f}% (M={worst['M']}), "
                     f"<= {slow['x_torch']:.2f}x torch (M={slow['M']})")
    return "; ".join(parts) + ("; all match torch" if ok else "; MISMATCH against torch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes under the CPU Triton interpreter")
    p.add_argument("--tokens", type=int, nargs="+", help=f"token counts M (default: {' '.join(map(str, GPU.tokens))})")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("the moe_kernel benchmark needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 1
    results = run(args.dry_run, tuple(args.tokens) if args.tokens else None)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
