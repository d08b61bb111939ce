"""The all-to-all MoE crossing (cluster/parallel/all_to_all.py): dispatch + combine, without expert compute.

    python benchmarks/all_to_all.py [--ranks 2] [--hidden 4096] [--tokens 1 8 64] [--reps 200] [--rounds 5]

`--ranks` processes on this machine, over a gloo group and over shared memory (cluster/parallel/shm_collectives.py),
side by side; every rank steps the same number of tokens, routed at random (top-2 of 8 experts, bf16 activations).
Per transport and step size, in interleaved rounds:
  - fixed, one capacity: the fixed path sized for `max(--tokens)` whatever the step (every crossing moves R*C rows);
  - fixed, per bucket: the fixed path with a capacity per step size (`buckets` = the step sizes), as an engine with
    CUDA graphs per decode bucket would run it;
  - variable: the counts exchanged first, then only the routed rows.
The experts are skipped (their output rows are a zero buffer made once), so what is timed is the packing, the
collectives and the sum. Also one bare `all_to_all_single` of one packed row per rank: the collective's own floor.
Rank 0 times each crossing (the ranks move in lockstep); each cell is the median over all rounds, in microseconds,
and the last table is shared memory's time over gloo's.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import shutil
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

from cluster.parallel.all_to_all import (ExpertAllToAll, TorchCollectives, largest_message_bytes,  # noqa: E402
                                         packed_row_bytes)
from cluster.parallel.rank_group import store_barrier  # noqa: E402
from cluster.parallel.shm_channel import shm_directory  # noqa: E402
from cluster.parallel.shm_collectives import ShmCollectives, create_shm_collectives  # noqa: E402

E, K = 8, 2
DTYPE = torch.bfloat16
PATHS = ("fixed, one capacity", "fixed, per bucket", "variable")
TRANSPORTS = ("gloo", "shm")


def _crossing(exchange: ExpertAllToAll, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
              zeros: torch.Tensor) -> None:
    crossing = exchange.dispatch(x, ids, w, x.shape[0])
    exchange.combine(crossing, zeros[:crossing.x.shape[0]])


def _floor(comm, row: torch.Tensor, out: torch.Tensor) -> None:
    comm.all_to_all_single(out, row)


def _rank(rank: int, ranks: int, init_file: str, shm_dir: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=60))
    most = max(args.tokens)
    shm = ShmCollectives(shm_dir, rank, ranks, largest_message_bytes(most, K, args.hidden, DTYPE), 60,
                         store_barrier(dist.distributed_c10d._get_default_store(), rank, ranks))
    groups = {"gloo": None, "shm": shm}
    zeros = torch.zeros(ranks * most * K, args.hidden)  # the experts' output rows, never recomputed
    g = torch.Generator().manual_seed(rank)
    runs = {}
    for t in args.tokens:
        x = torch.randn(t, args.hidden, generator=g).to(DTYPE)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
        w = torch.softmax(torch.randn(t, K, generator=g), -1)
        for transport, group in groups.items():
            exchanges = (ExpertAllToAll(group, E, K, most), ExpertAllToAll(group, E, K, most, buckets=args.tokens),
                         ExpertAllToAll(group, E, K, 0))  # the last: no fixed path
            for name, exchange in zip(PATHS, exchanges):
                runs[(transport, name, t)] = (_crossing, (exchange, x, ids, w, zeros))
    row = torch.zeros(ranks, packed_row_bytes(args.hidden, DTYPE), dtype=torch.uint8)
    for transport, group in groups.items():
        comm = group if group is not None else TorchCollectives(None, "cpu")
        runs[(transport, "floor", 1)] = (_floor, (comm, row, torch.empty_like(row)))
    times: dict[tuple[str, str, int], list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):  # interleaved: each round runs every transport, path and size once
        for key, (fn, fn_args) in runs.items():
            for _ in range(args.reps // 10):
                fn(*fn_args)  # warm: buffers made, caches hot
            dist.barrier()
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn(*fn_args)
                times[key].append(time.perf_counter() - t0)
    if rank == 0:
        _report(ranks, args, {key: statistics.median(t) for key, t in times.items()})
    shm.close()
    dist.destroy_process_group()


def _report(ranks: int, args: argparse.Namespace, median: dict[tuple[str, str, int], float]) -> None:
    print(f"{ranks} ranks on CPU, hidden {args.hidden} bf16, top-{K} of {E} experts, medians of "
          f"{args.rounds} x {args.reps} crossings (us)")
    header = "| crossing | " + " | ".join(f"T = {t}" for t in args.tokens) + " |\n|---|" + "---|" * len(args.tokens)
    for transport in TRANSPORTS:
        print(f"\n{transport}\n\n{header}")
        for name in PATHS:
            print(f"| {name} | " + " | ".join(f"{median[(transport, name, t)] * 1e6:.0f}" for t in args.tokens) + " |")
        floor = median[(transport, "floor", 1)] * 1e6
        print(f"\none bare all_to_all_single of one packed row per rank: {floor:.0f} us")
    print(f"\nshm / gloo (time)\n\n{header}")
    for name in PATHS:
        cells = [f"{median[('shm', name, t)] / median[('gloo', name, t)]:.2f}" for t in args.tokens]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"| bare all_to_all_single | {median[('shm', 'floor', 1)] / median[('gloo', 'floor', 1)]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.tokens = sorted(args.tokens)
    shm_dir = shm_directory()
    create_shm_collectives(shm_dir, args.ranks, largest_message_bytes(max(args.tokens), K, args.hidden, DTYPE))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_rank, args=(args.ranks, str(Path(tmp) / "init"), shm_dir, args), nprocs=args.ranks,
                               start_method="spawn")
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
