"""The CPU expert kernel against the torch backend, side by side, on one MoE layer stack of a given shape.

    python benchmarks/cpu_experts.py [--hidden 512 --ffn 1024 --layers 8] [--tokens 1 16 64 128 336 1024]

Each token count runs both backends over every layer (weights cold: the stack is larger than the cache), in
alternating rounds after one warm-up each; the median round is reported. Routing is top-2 of 8 with a skew like a
trained router's (the busiest expert gets ~1.5x the average).
"""

from __future__ import annotations

import argparse

import torch

from cluster.moe.cpu_backend import CpuMoEBackend
from cluster.moe.torch_backend import TorchMoEBackend
from cluster.moe.weights import ExpertWeights
from side_by_side import median_rounds, write_rows  # benchmarks/, this script's folder

EXPERTS, TOP_K = 8, 2


def layer_stack(layers: int, hidden: int, ffn: int) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(0)
    return [ExpertWeights(torch.randn(EXPERTS, 2 * ffn, hidden, generator=g) * 0.05,
                          torch.randn(EXPERTS, hidden, ffn, generator=g) * 0.05, tuple(range(EXPERTS)))
            for _ in range(layers)]


def routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, EXPERTS, generator=g) + torch.linspace(0, 1, EXPERTS)
    weights, ids = torch.topk(logits.softmax(-1), TOP_K)
    return ids.int(), weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 128, 336, 1024])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()

    stack = layer_stack(args.layers, args.hidden, args.ffn)
    backends = {"kernel": CpuMoEBackend(), "torch": TorchMoEBackend()}
    prepared = {name: [backend.prepare(w) for w in stack] for name, backend in backends.items()}  # once, at load
    print(f"{args.layers} layers of {EXPERTS} experts, hidden {args.hidden}, ffn {args.ffn}, fp32, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'tokens':>6} {'kernel ms':>10} {'torch ms':>9} {'kernel GFLOP/s':>15} {'torch GFLOP/s':>14} "
          f"{'torch/kernel':>13}")
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden)
        ids, weights = routing(tokens)
        torch.testing.assert_close(backends["kernel"](x, prepared["kernel"][0], ids, weights, EXPERTS),
                                   backends["torch"](x, prepared["torch"][0], ids, weights, EXPERTS),
                                   rtol=1e-4, atol=1e-4)
        runs = {name: (lambda backend=backend, layers=prepared[name]: [backend(x, layer, ids, weights, EXPERTS)
                                                                       for layer in layers])
                for name, backend in backends.items()}
        times = median_rounds(runs, args.rounds)
        kernel, reference = times["kernel"], times["torch"]
        flops = 2 * tokens * TOP_K * 3 * args.ffn * args.hidden * args.layers
        row = dict(tokens=tokens, kernel_ms=kernel * 1e3, torch_ms=reference * 1e3, kernel_gflops=flops / kernel / 1e9,
                   torch_gflops=flops / reference / 1e9, speedup=reference / kernel)
        rows.append(row)
        print(f"{tokens:>6} {row['kernel_ms']:>10.2f} {row['torch_ms']:>9.2f} {row['kernel_gflops']:>15.1f} "
              f"{row['torch_gflops']:>14.1f} {row['speedup']:>12.2f}x")
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
