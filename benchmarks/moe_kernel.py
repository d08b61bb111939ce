"""Fused-MoE Triton backend vs the per-expert torch/cuBLAS loop on Mixtral shapes, against measured ceilings.

Legend: M = tokens, K = experts per token, D = hidden, F = ffn, E = experts.
Per (shape, M): check the Triton output against the loop, time both with triton.testing.do_bench (median), and
report achieved HBM bandwidth (weights of the experts actually touched + activations) and bf16 FLOP rate
(2 * 3 * M * K * D * F) as a fraction of the copy bandwidth and matmul peak measured in the same run.

    python benchmarks/moe_kernel.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEVICE = "cuda"  # the only device these are meant for; a CPU dry run under TRITON_INTERPRET may patch it

SHAPES = {"8x7B": (8, 4096, 14336), "8x22B": (8, 6144, 16384)}  # name: (E, D, F)
TOKENS = [1, 16, 64, 256, 1024, 4096]
QUICK_SHAPES, QUICK_TOKENS = ["8x7B"], [1, 64, 4096]
TOP_K = 2
# Goals: bandwidth-bound decode, compute-bound prefill, and the win over the loop at small batches.
BW_GOAL, BW_MAX_M = 0.75, 16
FLOP_GOAL, FLOP_MIN_M = 0.70, 4096
SPEEDUP_GOAL, SPEEDUP_MAX_M = 1.3, 64
CHECK_TOL = 2e-2  # bf16 relative error, Triton vs loop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES} at M in {QUICK_TOKENS}")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="shapes to run (default: all)")
    p.add_argument("--tokens", type=int, nargs="+", help=f"token counts M (default: {TOKENS})")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time per measurement, ms")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    return p.parse_args(argv)


def measure_bandwidth(bench) -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting read + write."""
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def measure_peak(bench) -> float:
    """FLOP/s of an 8192^3 bf16 torch.matmul."""
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=DEVICE)
    ms = bench(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3)


def make_weights(e: int, d: int, f: int):
    from cluster.moe.weights import ExpertWeights

    w13 = torch.randn(e, 2 * f, d, dtype=torch.bfloat16, device=DEVICE).mul_(d**-0.5)  # [E, 2F, D]
    w2 = torch.randn(e, d, f, dtype=torch.bfloat16, device=DEVICE).mul_(f**-0.5)  # [E, D, F]
    return ExpertWeights(w13, w2, tuple(range(e)))


def route(m: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral-style routing of random logits: top-K of the softmax, renormalised. -> ids, weights [M, K]."""
    probs = torch.softmax(torch.randn(m, e, device=DEVICE), dim=-1)
    w, ids = probs.topk(TOP_K, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True))


def run_case(name: str, weights, m: int, bench, bw: float, peak: float) -> dict:
    from cluster.moe.backend import TorchMoEBackend
    from cluster.moe.triton_backend import TritonMoEBackend

    e, d, f = weights.w13.shape[0], weights.w13.shape[2], weights.w2.shape[2]
    x = torch.randn(m, d, dtype=torch.bfloat16, device=DEVICE)  # [M, D]
    ids, tw = route(m, e)
    triton_moe, loop = TritonMoEBackend(), TorchMoEBackend()

    ref = loop(x, weights, ids, tw, e).float()
    err = ((triton_moe(x, weights, ids, tw, e).float() - ref).norm() / ref.norm()).item()
    t_ms = bench(lambda: triton_moe(x, weights, ids, tw, e))
    l_ms = bench(lambda: loop(x, weights, ids, tw, e))

    touched = ids.unique().numel()
    nbytes = touched * weights.nbytes // e + 2 * x.nbytes  # touched experts' weights + x read + out written
    flops = 2 * 3 * m * TOP_K * d * f
    row = {"shape": name, "M": m, "triton_ms": t_ms, "loop_ms": l_ms, "speedup": l_ms / t_ms,
           "bw_frac": nbytes / (t_ms * 1e-3) / bw, "flop_frac": flops / (t_ms * 1e-3) / peak,
           "experts_touched": touched, "rel_err": err, "check": err < CHECK_TOL,
           "config": triton_moe.config(m, weights).to_json()}
    goals = {}
    if m <= BW_MAX_M:
        goals[f"bw>={BW_GOAL:.0%}"] = row["bw_frac"] >= BW_GOAL
    if m >= FLOP_MIN_M:
        goals[f"peak>={FLOP_GOAL:.0%}"] = row["flop_frac"] >= FLOP_GOAL
    if m <= SPEEDUP_MAX_M:
        goals[f"x{SPEEDUP_GOAL}"] = row["speedup"] >= SPEEDUP_GOAL
    row["goals"] = goals
    return row


def format_row(r: dict) -> str:
    goals = " ".join(f"{g}:{'PASS' if ok else 'FAIL'}" for g, ok in r["goals"].items())
    check = "ok" if r["check"] else f"WRONG({r['rel_err']:.1e})"
    return (f"{r['M']:>5} {r['shape']:>6} {r['triton_ms']:>9.3f} {r['loop_ms']:>9.3f} {r['speedup']:>7.2f}x "
            f"{r['bw_frac']:>6.1%} {r['flop_frac']:>6.1%} {check:>6}  {goals}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_kernel benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("warning: TRITON_INTERPRET=1, timings are of the interpreter", file=sys.stderr)
    import triton.testing

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")

    shapes = args.shapes or (QUICK_SHAPES if args.quick else list(SHAPES))
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    bw, peak = measure_bandwidth(bench), measure_peak(bench)
    torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'M':>5} {'shape':>6} {'triton ms':>9} {'loop ms':>9} {'speedup':>8} {'bw %':>6} {'peak %':>6} "
          f"{'check':>6}  goals")
    rows = []
    for name in shapes:
        weights = make_weights(*SHAPES[name])
        for m in tokens:
            rows.append(run_case(name, weights, m, bench, bw, peak))
            print(format_row(rows[-1]), flush=True)
        del weights
        torch.cuda.empty_cache()

    failed = [r for r in rows if not r["check"] or not all(r["goals"].values())]
    print(f"{len(rows) - len(failed)}/{len(rows)} rows meet every goal and match the loop")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device, "hbm_bytes_per_s": bw, "bf16_flops_per_s": peak,
                                        "top_k": TOP_K, "rows": rows}, indent=2))
    return 0 if all(r["check"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
