"""Sweep fused-MoE block configs per token count M on a GPU and write the tuning JSON the backend loads.

Legend: M = tokens, K = experts per token, D = hidden, F = ffn, E = local experts.
For each M and each BLOCK_M, the gate_up and down kernels are timed separately over their grids (they only
share BLOCK_M); the BLOCK_M with the smallest best-gate_up + best-down time wins.

    python benchmarks/tune_moe.py --experts 8 --hidden 4096 --ffn 14336 [--quick]
    -> cluster/kernels/configs/E=8,N=14336,device=<gpu>,triton=<major.minor>.json  (the key `tuning` looks up)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEVICE = "cuda"  # the only device these are meant for; a CPU dry run under TRITON_INTERPRET may patch it

TOKENS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096]
QUICK_TOKENS = [1, 16, 64, 256, 1024, 4096]
SMEM_LIMIT = 220 * 1024  # bytes of shared memory a config may plan for (H100/H200: 227 KiB per block)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8, help="local experts E")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size D")
    p.add_argument("--ffn", type=int, default=14336, help="ffn size F (the N of the file name)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--tokens", type=int, nargs="+", help=f"token counts M (default: {TOKENS})")
    p.add_argument("--quick", action="store_true", help=f"smaller grid, M in {QUICK_TOKENS}")
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time per config, ms")
    p.add_argument("--out-dir", type=Path, help="default: cluster/kernels/configs")
    return p.parse_args(argv)


def block_ms(m: int, top_k: int, experts: int) -> list[int]:
    """BLOCK_M candidates: up to the next power of two above the mean pairs per expert."""
    mean = max(1, m * top_k // experts)
    return [bm for bm in (16, 32, 64, 128) if bm <= max(16, 1 << (mean - 1).bit_length())]


def kernel_grid(bm: int, quick: bool, gate_up: bool, elem: int):
    from cluster.kernels.tuning import KernelConfig

    ns = [64, 128] if quick else [32, 64, 128, 256]
    ks = [64, 128] if quick else [64, 128, 256]
    groups = [1] if bm <= 16 else ([8] if quick else [1, 8])
    warps = [4] if quick else [4, 8]
    stages = [3, 4] if quick else [3, 4, 5]
    for n, k, g, w, s in itertools.product(ns, ks, groups, warps, stages):
        if gate_up and n < 32:
            continue
        if s * (bm * k + k * n) * elem > SMEM_LIMIT:  # A tile + weight tile(s) per pipeline stage
            continue
        yield KernelConfig(bm, n, k, g, w, s)


def best(configs, run, bench) -> tuple[float, object]:
    found = (float("inf"), None)
    for cfg in configs:
        try:
            ms = bench(lambda: run(cfg))
        except Exception as exc:  # out of resources and other compile failures: skip the config
            print(f"    skip {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        found = min(found, (ms, cfg), key=lambda p: p[0])
    return found


def tune_m(m: int, args, w13: torch.Tensor, w2: torch.Tensor, bench):
    from cluster.kernels.align import align_pairs
    from cluster.kernels.fused_moe import down, gate_up
    from cluster.kernels.tuning import MoEConfig

    e, d, f = args.experts, args.hidden, args.ffn
    k = min(args.top_k, e)  # a token reaches each local expert at most once (a shard of one expert: k = 1)
    x = torch.randn(m, d, dtype=w13.dtype, device=DEVICE)  # [M, D]
    probs = torch.softmax(torch.randn(m, e, device=DEVICE), dim=-1)
    tw, ids = probs.topk(k, dim=-1)  # [M, K]
    emap = torch.arange(e, dtype=torch.int32, device=DEVICE)
    choice = (float("inf"), None)
    for bm in block_ms(m, k, e):
        aligned = align_pairs(ids, emap, e, bm)
        h = torch.zeros(aligned.sorted_ids.numel(), f, dtype=w13.dtype, device=DEVICE)  # [C, F]
        y = torch.zeros(m * k, d, dtype=torch.float32, device=DEVICE)  # [P, D]
        gu_ms, gu = best(kernel_grid(bm, args.quick, True, w13.element_size()),
                         lambda c: gate_up(x, w13, h, aligned, k, c), bench)
        dn_ms, dn = best(kernel_grid(bm, args.quick, False, w13.element_size()),
                         lambda c: down(h, w2, y, tw, aligned, c), bench)
        if gu is None or dn is None:
            continue
        print(f"  M={m} BLOCK_M={bm}: gate_up {gu_ms:.3f} ms, down {dn_ms:.3f} ms")
        choice = min(choice, (gu_ms + dn_ms, MoEConfig(gu, dn)), key=lambda p: p[0])
    return choice[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_moe needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton.testing

    from cluster.dtype import parse_dtype
    from cluster.kernels.tuning import CONFIG_DIR, config_file_name, device_name, triton_version

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=args.rep, return_mode="median")

    dtype = parse_dtype(args.dtype)
    e, d, f = args.experts, args.hidden, args.ffn
    w13 = torch.randn(e, 2 * f, d, dtype=dtype, device=DEVICE).mul_(d**-0.5)  # [E, 2F, D]
    w2 = torch.randn(e, d, f, dtype=dtype, device=DEVICE).mul_(f**-0.5)  # [E, D, F]
    out = (args.out_dir or CONFIG_DIR) / config_file_name(e, f, device_name("cuda"), triton_version())
    table = {}
    for m in args.tokens or (QUICK_TOKENS if args.quick else TOKENS):
        start = time.time()
        cfg = tune_m(m, args, w13, w2, bench)
        if cfg is None:
            print(f"M={m}: no config ran", file=sys.stderr)
            continue
        table[str(m)] = cfg.to_json()
        print(f"M={m}: {table[str(m)]} ({time.time() - start:.0f} s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=2) + "\n")  # after every M, so an interrupted sweep keeps results
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
