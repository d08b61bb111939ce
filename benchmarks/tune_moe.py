"""Sweep fused-MoE block configs per token count M on a GPU and write the tuning table the backend loads.

Legend: M = tokens, K = experts per token, D = hidden, F = ffn, E = local experts, BM = BLOCK_M.
A quick sweep's picks regressed when rerun (one short timing per config, each config timed in a block of its own,
kernels timed apart from each other), so each M goes through four steps:
  screen  every gate_up and every down candidate of each BM timed once, short; the best `--keep` of each go on
  rank    the survivors timed in `--rounds` rounds, each visiting every one in a fresh random order (`--rep` ms each),
          so drift (clocks, heat, other tenants) lands on all of them alike; a candidate's time is its median
  verify  the `--top` (gate_up, down) pairs of one BM by ranked time, the default config and the torch backend, each
          run end to end (align + gate_up + down, as the Triton backend runs them) in interleaved rounds; a config
          whose output is off the torch backend's is dropped
  pick    the fastest verified config, written only if it beats the default by `--margin`; else the entry is
          "default" (`default_config` at that M). No file is written when every entry is "default".
The file is keyed by device, dtype and Triton version (`tuning.config_file_name`), the key `tuning` looks up.

    python benchmarks/tune_moe.py --experts 8 --hidden 4096 --ffn 14336 [--dtype bf16] [--quick] [--report r.json]
    -> cluster/kernels/configs/E=8,N=14336,device=<gpu>,dtype=bf16,triton=<major.minor>.json
    python benchmarks/tune_moe.py --dry-run [--out-dir DIR]    # tiny shapes under the CPU interpreter, in seconds
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

TOKENS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096]
QUICK_TOKENS = [1, 16, 64, 256, 1024, 4096]
CHECK_TOL = 2e-2  # relative error against the torch backend (16-bit; as benchmarks/moe_kernel.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8, help="local experts E")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size D")
    p.add_argument("--ffn", type=int, default=14336, help="ffn size F (the N of the file name)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--tokens", type=int, nargs="+", help=f"token counts M (default: {TOKENS})")
    p.add_argument("--quick", action="store_true", help=f"smaller grid, M in {QUICK_TOKENS}")
    p.add_argument("--rep", type=int, default=100, help="ms of repetitions per timing in the rank and verify rounds")
    p.add_argument("--screen-rep", type=int, default=20, help="ms of repetitions per screening timing")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the rank and verify steps")
    p.add_argument("--keep", type=int, default=6, help="candidates per kernel and BM the screen keeps")
    p.add_argument("--top", type=int, default=3, help="configs verified end to end beside the default")
    p.add_argument("--margin", type=float, default=0.03, help="fraction a pick must beat the default by")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, help="default: cluster/kernels/configs (a dry run: a temporary folder)")
    p.add_argument("--report", type=Path, help="also write every verified timing here as JSON")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes and grid on the CPU under the interpreter")
    args = p.parse_args(argv)
    if args.dry_run:
        args.experts, args.hidden, args.ffn, args.tokens = 4, 64, 128, args.tokens or [4, 40]
        args.rounds, args.keep, args.top = min(args.rounds, 2), min(args.keep, 2), min(args.top, 2)
    return args


# -- the timing steps: pure, so tests drive them with fake clocks -------------------------------------------------

def interleaved(candidates: Sequence[Any], time_one: Callable[[Any], float], rounds: int,
                rng: random.Random) -> list[float]:
    """Median time of each candidate over `rounds` rounds, each visiting every candidate once in a fresh random
    order. A candidate that raises (out of resources, a compile error) gets inf and is not timed again."""
    times: list[list[float]] = [[] for _ in candidates]
    failed: set[int] = set()
    for _ in range(rounds):
        order = [i for i in range(len(candidates)) if i not in failed]
        rng.shuffle(order)
        for i in order:
            try:
                times[i].append(time_one(candidates[i]))
            except Exception as exc:  # a config that cannot run (out of resources, ...) is a result, not an error
                print(f"    skip {candidates[i]}: {type(exc).__name__}", file=sys.stderr)
                failed.add(i)
    return [float("inf") if i in failed or not t else statistics.median(t) for i, t in enumerate(times)]


def best(candidates: Sequence[Any], ms: Sequence[float], keep: int) -> list[tuple[float, Any]]:
    """The `keep` fastest (ms, candidate) that ran, fastest first."""
    ranked = sorted(((t, c) for t, c in zip(ms, candidates, strict=True) if t != float("inf")), key=lambda p: p[0])
    return ranked[:keep]


def choose(default_ms: float, verified: Sequence[tuple[float, Any]], margin: float) -> Any | None:
    """The fastest verified config if it beats the default by `margin` (a fraction of the default's time), else
    None (keep the default)."""
    if not verified:
        return None
    ms, cfg = min(verified, key=lambda p: p[0])
    return cfg if ms <= default_ms * (1.0 - margin) else None


# -- candidates ---------------------------------------------------------------------------------------------------

def block_ms(m: int, top_k: int, experts: int, dry_run: bool = False) -> list[int]:
    """BLOCK_M candidates: up to the next power of two above the mean pairs per expert."""
    if dry_run:
        return [32]  # the interpreter: blocks >= 32 (DESIGN.md)
    mean = max(1, m * top_k // experts)
    return [bm for bm in (16, 32, 64, 128) if bm <= max(16, 1 << (mean - 1).bit_length())]


def kernel_grid(bm: int, quick: bool, gate_up: bool, smem: int, dry_run: bool = False) -> list:
    """Launch configs of one kernel at BLOCK_M = bm whose pipeline fits `smem` bytes (16-bit tiles)."""
    from cluster.kernels.tuning import KernelConfig, smem_bytes

    if dry_run:
        ns, ks, groups, warps, stages = ([64, 128] if gate_up else [32, 64]), [32, 64], [1], [4], [2]
    else:
        ns = [64, 128, 256] if quick else [32, 64, 128, 256]
        ks = [64, 128] if quick else [64, 128, 256]
        groups = [1] if bm <= 16 else ([8] if quick else [1, 8, 16])
        warps = [4, 8]
        stages = [3, 4] if quick else [2, 3, 4, 5]
    grid = []
    for n, k, g, w, s in itertools.product(ns, ks, groups, warps, stages):
        cfg = KernelConfig(bm, n, k, g, w, s)
        if (gate_up and n < 32) or smem_bytes(cfg) > smem:
            continue
        grid.append(cfg)
    return grid


# -- one M ---------------------------------------------------------------------------------------------------------

def make_inputs(m: int, e: int, k: int, d: int, dtype: torch.dtype, device: str, g: torch.Generator):
    """x [M, D], topk_ids [M, K] int64 of local ids 0..E-1 (E = 1: every token on the one expert), fp32 [M, K]."""
    x = torch.randn(m, d, generator=g, device=device).to(dtype)
    _, ids = torch.randn(m, e, generator=g, device=device).topk(k, dim=-1)
    tw = torch.softmax(torch.randn(m, k, generator=g, device=device), dim=-1)
    return x, ids, tw


def tune_m(m: int, args: argparse.Namespace, weights, bench, device: str, rng: random.Random) -> dict:
    """The four steps at one M; -> a report row whose "entry" is the table entry (a config's JSON or "default")."""
    from cluster.kernels.align import align_pairs
    from cluster.kernels.fused_moe import down, fused_experts, gate_up
    from cluster.kernels.tuning import DEFAULT, SMEM_LIMIT, MoEConfig, default_config, device_smem
    from cluster.moe.torch_backend import TorchMoEBackend

    e, d, f = args.experts, args.hidden, args.ffn
    k = min(args.top_k, e)  # a token reaches each local expert at most once (a shard of one expert: k = 1)
    w13, w2 = weights.w13, weights.w2
    g = torch.Generator(device=device).manual_seed(args.seed * 100003 + m)
    x, ids, tw = make_inputs(m, e, k, d, w13.dtype, device, g)
    emap = torch.arange(e, dtype=torch.int32, device=device)
    smem = min(SMEM_LIMIT, device_smem(device) or SMEM_LIMIT)

    pairs: list[tuple[float, MoEConfig]] = []
    for bm in block_ms(m, k, e, args.dry_run):
        aligned = align_pairs(ids, emap, e, bm)
        h = torch.zeros(aligned.sorted_ids.numel(), f, dtype=w13.dtype, device=device)  # [C, F]
        y = torch.zeros(m * k, d, dtype=torch.float32, device=device)  # [P, D]
        gu = rank_kernel(kernel_grid(bm, args.quick, True, smem, args.dry_run),
                         lambda c, a=aligned, h=h: gate_up(x, w13, h, a, k, c), args, bench, rng)
        dn = rank_kernel(kernel_grid(bm, args.quick, False, smem, args.dry_run),
                         lambda c, a=aligned, h=h, y=y: down(h, w2, y, tw, a, c), args, bench, rng)
        pairs += [(gu_ms + dn_ms, MoEConfig(a, b)) for (gu_ms, a), (dn_ms, b) in itertools.product(gu, dn)]
    tops = [cfg for _, cfg in sorted(pairs, key=lambda p: p[0])[:args.top]]

    default = default_config(m, w13.dtype, smem=device_smem(device))  # what serving runs without a table
    torch_moe = TorchMoEBackend()
    torch_layer = torch_moe.prepare(weights)
    want = torch_moe(x, torch_layer, ids, tw, e).float()

    def run(cfg: MoEConfig) -> torch.Tensor:
        return fused_experts(x, w13, w2, tw, align_pairs(ids, emap, e, cfg.block_m), cfg)

    checked = [cfg for cfg in dict.fromkeys([default, *tops]) if _rel_err(run(cfg).float(), want) < CHECK_TOL]
    if default not in checked:
        print(f"  M={m}: the default config is off the torch backend", file=sys.stderr)
    runs: list[Any] = [*checked, "torch"]

    def call(c: Any) -> Callable[[], object]:
        return (lambda: torch_moe(x, torch_layer, ids, tw, e)) if c == "torch" else (lambda: run(c))

    ms = interleaved(runs, lambda c: bench(call(c), rep=args.rep), args.rounds, rng)
    timed = {str(c): t for c, t in zip(runs, ms, strict=True)}
    default_ms = timed.get(str(default), float("inf"))
    verified = [(timed[str(cfg)], cfg) for cfg in checked if cfg != default]
    pick = choose(default_ms, verified, args.margin)
    return {"M": m, "default": default.to_json(), "default_ms": default_ms, "torch_ms": timed["torch"],
            "verified": [{"config": cfg.to_json(), "ms": t} for t, cfg in verified],
            "entry": DEFAULT if pick is None else pick.to_json()}


def rank_kernel(grid: list, launch: Callable[[Any], object], args: argparse.Namespace, bench,
                rng: random.Random) -> list[tuple[float, Any]]:
    """Screen (one short interleaved round), then rank the `--keep` best in `--rounds` long ones: -> the two
    fastest (median ms, config)."""
    screened = interleaved(grid, lambda c: bench(lambda: launch(c), rep=args.screen_rep), 1, rng)
    survivors = [c for _, c in best(grid, screened, args.keep)]
    ranked = interleaved(survivors, lambda c: bench(lambda: launch(c), rep=args.rep), args.rounds, rng)
    return best(survivors, ranked, 2)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


# -- the sweep -----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined (imported)
    elif not torch.cuda.is_available():
        print("tune_moe needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 1
    from ceilings import median_timer

    from cluster.dtype import parse_dtype
    from cluster.kernels.tuning import CONFIG_DIR, DEFAULT, config_file_name, device_name, dtype_key, triton_version
    from cluster.moe.weights import ExpertWeights

    device = "cpu" if args.dry_run else "cuda"
    bench = median_timer(torch.device(device), rep=args.rep)
    dtype = parse_dtype(args.dtype)
    e, d, f = args.experts, args.hidden, args.ffn
    g = torch.Generator(device=device).manual_seed(args.seed)
    w13 = (torch.randn(e, 2 * f, d, generator=g, device=device) * d**-0.5).to(dtype)  # [E, 2F, D]
    w2 = (torch.randn(e, d, f, generator=g, device=device) * f**-0.5).to(dtype)  # [E, D, F]
    weights = ExpertWeights(w13, w2, tuple(range(e)))
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="tune_moe_")) if args.dry_run else CONFIG_DIR)
    out = out_dir / config_file_name(e, f, device_name(device), triton_version(), dtype=dtype_key(dtype))
    rng = random.Random(args.seed)
    rows, table = [], {}
    for m in args.tokens or (QUICK_TOKENS if args.quick else TOKENS):
        start = time.time()
        row = tune_m(m, args, weights, bench, device, rng)
        rows.append(row)
        table[str(m)] = row["entry"]
        best_ms = min([row["default_ms"], *(v["ms"] for v in row["verified"])])
        print(f"M={m}: {'default kept' if row['entry'] == DEFAULT else row['entry']}; default "
              f"{row['default_ms']:.4f} ms, best {best_ms:.4f} ms, torch {row['torch_ms']:.4f} ms "
              f"({time.time() - start:.0f} s)", flush=True)
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                              indent=1) + "\n")
    if all(entry == DEFAULT for entry in table.values()):
        print(f"no M beat the default by {args.margin:.0%}: nothing written")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
