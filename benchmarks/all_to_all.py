"""The all-to-all MoE crossing (cluster/parallel/all_to_all.py): dispatch + combine, without expert compute.

    python benchmarks/all_to_all.py [--ranks 2] [--hidden 4096] [--tokens 1 8 64] [--reps 200] [--rounds 5]

`--ranks` processes on one gloo group on this machine; every rank steps the same number of tokens, routed at random
(top-2 of 8 experts, bf16 activations). Per step size, side by side in interleaved rounds:
  - fixed, one capacity: the fixed path sized for `max(--tokens)` whatever the step (every crossing moves R*C rows);
  - fixed, per bucket: the fixed path with a capacity per step size (`buckets` = the step sizes), as an engine with
    CUDA graphs per decode bucket would run it;
  - variable: the counts exchanged first, then only the routed rows.
The experts are skipped (their output rows are a zero buffer made once), so what is timed is the packing, the
collectives and the sum. Also one bare `all_to_all_single` of one packed row per rank: the collective's own floor.
Rank 0 times each crossing (the ranks move in lockstep); each cell is the median over all rounds, in microseconds.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.parallel.all_to_all import ExpertAllToAll, packed_row_bytes  # noqa: E402

E, K = 8, 2
DTYPE = torch.bfloat16


def _crossing(exchange: ExpertAllToAll, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
              zeros: torch.Tensor) -> None:
    crossing = exchange.dispatch(x, ids, w, x.shape[0])
    exchange.combine(crossing, zeros[:crossing.x.shape[0]])


def _floor(row: torch.Tensor, out: torch.Tensor) -> None:
    dist.all_to_all_single(out, row)


def _rank(rank: int, ranks: int, init_file: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=60))
    most = max(args.tokens)
    one = ExpertAllToAll(None, E, K, most)
    bucketed = ExpertAllToAll(None, E, K, most, buckets=args.tokens)
    variable = ExpertAllToAll(None, E, K, 0)  # no fixed path
    zeros = torch.zeros(ranks * one.capacity(most), args.hidden)  # the experts' output rows, never recomputed
    g = torch.Generator().manual_seed(rank)
    runs = {}
    for t in args.tokens:
        x = torch.randn(t, args.hidden, generator=g).to(DTYPE)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
        w = torch.softmax(torch.randn(t, K, generator=g), -1)
        for name, exchange in (("fixed, one capacity", one), ("fixed, per bucket", bucketed), ("variable", variable)):
            runs[(name, t)] = (_crossing, (exchange, x, ids, w, zeros))
    row = torch.zeros(ranks, packed_row_bytes(args.hidden, DTYPE), dtype=torch.uint8)
    runs[("one bare all_to_all_single, 1 row", 1)] = (_floor, (row, torch.empty_like(row)))
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, (fn, fn_args) in runs.items():
            for _ in range(args.reps // 10):
                fn(*fn_args)  # warm: buffers made, caches hot
            dist.barrier()
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn(*fn_args)
                times[key].append(time.perf_counter() - t0)
    if rank == 0:
        print(f"{ranks} ranks, gloo on CPU, hidden {args.hidden} bf16, top-{K} of {E} experts, medians of "
              f"{args.rounds} x {args.reps} crossings (us)\n")
        print("| crossing | " + " | ".join(f"T = {t}" for t in args.tokens) + " |")
        print("|---|" + "---|" * len(args.tokens))
        for name in ("fixed, one capacity", "fixed, per bucket", "variable"):
            cells = [f"{statistics.median(times[(name, t)]) * 1e6:.0f}" for t in args.tokens]
            print(f"| {name} | " + " | ".join(cells) + " |")
        floor = statistics.median(times[("one bare all_to_all_single, 1 row", 1)]) * 1e6
        print(f"\none bare all_to_all_single of one packed row per rank: {floor:.0f} us")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.tokens = sorted(args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(args.ranks, str(Path(tmp) / "init"), args), nprocs=args.ranks,
                           start_method="spawn")


if __name__ == "__main__":
    main()
