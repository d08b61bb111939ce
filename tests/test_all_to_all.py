"""The all-to-all MoE layer (`cluster.parallel.all_to_all`) over real groups of 2 and 4 processes: gloo, and shared
memory (`cluster.parallel.shm_collectives`).

Every rank steps its own tokens through the same sequence of cases (collectives pair up in call order); the parent
then checks each rank's output against one process running the whole layer (`LocalExpertExecutor`, every expert) over
all ranks' tokens concatenated in rank order. That is the exact counterpart of the split layer: each expert's matmul
sees the same rows in the same order, and a token's two fp32 terms add up alike in either order, so with the torch
backend's per-expert matmuls the outputs must be equal bit for bit, as tests/test_expert_parallel.py and
tests/test_distributed.py require of the other transports. The default backend's cases allow fp32 rounding: the C
kernel (where it builds) adds each weighted term into the token's sum with one fused multiply-add, so a term that
comes back from another rank, rounded on its own first, can change the last bit (as with the other transports).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cluster.moe.backend import backend_name, get_backend
from cluster.moe.executor import LocalExpertExecutor
from cluster.moe.torch_backend import TorchMoEBackend
from cluster.moe.weights import ExpertWeights
from cluster.parallel.all_to_all import AllToAllExperts, ExpertAllToAll
from cluster.parallel.placement import assign_experts
from cluster.parallel.rank_group import store_barrier
from cluster.parallel.shm_channel import shm_directory
from cluster.parallel.shm_collectives import ShmCollectives, create_shm_collectives
from cluster.parallel.shard_worker import ShardWorker
from tests.ranks import run_ranks

E, D, F, K, LAYERS = 8, 64, 96, 2, 2
MAX_TOKENS, BUCKETS = 8, (1, 4)
SLOT_BYTES = 1 << 16  # the largest message of any case: 80 pairs of a prefill to one rank (~21 KB)
JOIN_TIMEOUT_S = 120.0  # the ranks' whole run; a hung collective fails the test (gloo's own timeout is 30 s below)


@dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple[int, ...]  # per rank (the first R of them)
    path: str  # the path every rank must take: "fixed" or "variable"
    to_rank: int | None = None  # every pair routes to this rank's experts (None: random routing)
    agree: bool = False  # the executor agrees on the step itself (else `begin_step` with the known maximum)
    dtype: torch.dtype = torch.float32
    backend: str = "exact"  # "exact": torch, one matmul per expert; "auto": the default backend here
    layer: int = 0


def _cases(ranks: int) -> list[Case]:
    return [
        Case("decode", (5, 0, 8, 3), "fixed"),
        Case("decode-all-to-last-rank", (8,) * 4, "fixed", to_rank=ranks - 1, layer=1),  # fills the capacity
        Case("decode-smallest-bucket", (1, 1, 0, 1), "fixed", agree=True),
        Case("all-idle", (0,) * 4, "fixed", agree=True),
        Case("prefill", (40, 0, 17, 33), "variable", layer=1),
        Case("prefill-all-to-rank-0", (20, 12, 9, 30), "variable", to_rank=0, agree=True),
        Case("one-rank-over-max-tokens", (3, 12, 0, 1), "variable", agree=True),  # rank 0's 3 go variable too
        Case("decode-bf16", (7, 2, 0, 8), "fixed", dtype=torch.bfloat16, layer=1),
        Case("prefill-bf16", (0, 25, 11, 2), "variable", dtype=torch.bfloat16),
        Case("decode-default-backend", (6, 8, 1, 0), "fixed", backend="auto"),
        Case("prefill-default-backend", (33, 5, 0, 17), "variable", backend="auto", layer=1),
    ]


def _layers(dtype: torch.dtype, experts: tuple[int, ...] = tuple(range(E))) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(LAYERS):
        w13 = torch.randn(E, 2 * F, D, generator=g) / D**0.5
        w2 = torch.randn(E, D, F, generator=g) / F**0.5
        out.append(ExpertWeights(w13[list(experts)].to(dtype), w2[list(experts)].to(dtype), experts))
    return out


def _inputs(case: Case, ranks: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each rank's (x [T, D], topk_ids [T, K] int64, topk_weights [T, K] fp32), drawn for all ranks at once."""
    g = torch.Generator().manual_seed(seed)
    counts = case.tokens[:ranks]
    total = sum(counts)
    x = torch.randn(total, D, generator=g).to(case.dtype)
    pool = torch.arange(E) if case.to_rank is None else torch.tensor(assign_experts(E, ranks)[case.to_rank])
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(total)]) if total else \
        torch.empty(0, K, dtype=torch.long)
    weights = torch.softmax(torch.randn(total, K, generator=g), -1)
    return list(zip(x.split(counts), ids.split(counts), weights.split(counts)))


def _backend(name: str):
    if name == "exact":
        backend = TorchMoEBackend()
        backend.batched_max_rows = 0  # one matmul per expert, whatever the rows
        return backend
    return get_backend(name)


def _group(transport: str, rank: int, ranks: int, init_file: str, shm_dir: str) -> ShmCollectives | None:
    """The rank's group: the default gloo group (None), or shared memory with a file store for its barriers."""
    if transport == "gloo":
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks,
                                timeout=timedelta(seconds=30))
        return None
    barrier = store_barrier(dist.FileStore(init_file, ranks), rank, ranks)
    return ShmCollectives(shm_dir, rank, ranks, SLOT_BYTES, timeout_s=30, barrier=barrier)


def _rank_main(rank: int, ranks: int, init_file: str, out_dir: str, auto: str, transport: str,
               shm_dir: str) -> None:
    """One rank: every case in order; saves its outputs, the path each dispatch took and the rows it received."""
    torch.set_num_threads(1)
    group = _group(transport, rank, ranks, init_file, shm_dir)
    try:
        exchange = ExpertAllToAll(group, E, K, MAX_TOKENS, buckets=BUCKETS)
        experts = assign_experts(E, ranks)[rank]
        executors = {}
        dispatched: list[tuple[str, int, int]] = []  # per dispatch: path, rows received, rows naming an expert
        dispatch = exchange.dispatch

        def recording(*args, **kw):
            crossing = dispatch(*args, **kw)
            valid = int((crossing.topk_ids != E).sum())
            dispatched.append(("fixed" if crossing.splits is None else "variable", crossing.x.shape[0], valid))
            return crossing

        exchange.dispatch = recording
        results = {}
        for i, case in enumerate(_cases(ranks)):
            key = (case.dtype, case.backend)
            if key not in executors:
                backend = _backend(auto if case.backend == "auto" else "exact")
                executors[key] = AllToAllExperts(exchange, ShardWorker(_layers(case.dtype, experts), E, backend))
            executor = executors[key]
            x, ids, w = _inputs(case, ranks, seed=i)[rank]
            executor.begin_step(None if case.agree else max(case.tokens[:ranks]))
            dispatched.clear()
            out = executor(case.layer, x, ids, w)
            results[case.name] = {"out": out, "dispatched": list(dispatched)}
        results["refused"] = _refusals(exchange, experts)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if group is None:
            dist.destroy_process_group()
        else:
            group.close()


def _refusals(exchange: ExpertAllToAll, experts: tuple[int, ...]) -> list[str]:
    """What this rank refuses before any collective: more tokens than the step agreed, a worker with other experts."""
    refused = []
    x, ids, w = torch.zeros(3, D), torch.zeros(3, K, dtype=torch.long), torch.full((3, K), 0.5)
    others = ShardWorker(_layers(torch.float32, tuple(e for e in range(E) if e not in experts)), E, _backend("exact"))
    for attempt in (lambda: exchange.dispatch(x, ids, w, step_tokens=2), lambda: AllToAllExperts(exchange, others)):
        try:
            attempt()
        except ValueError as e:
            refused.append(str(e))
    return refused


@pytest.fixture(scope="module", params=[("gloo", 2), ("gloo", 4), ("shm", 2), ("shm", 4)],
                ids=["gloo-2-ranks", "gloo-4-ranks", "shm-2-ranks", "shm-4-ranks"])
def run(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """(R, each rank's results): R processes on one gloo group or over shared memory, started with spawn and joined
    within a deadline."""
    transport, ranks = request.param
    tmp = tmp_path_factory.mktemp(f"a2a-{transport}{ranks}")
    shm_dir = shm_directory()
    create_shm_collectives(shm_dir, ranks, SLOT_BYTES)
    auto = backend_name("auto", "cpu")
    get_backend(auto)  # the C kernels built here once, not by every rank at once
    try:
        run_ranks(_rank_main, (ranks, str(tmp / "init"), str(tmp), auto, transport, shm_dir), ranks, JOIN_TIMEOUT_S)
        removed = not Path(shm_dir).exists()
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    assert removed == (transport == "shm")  # the ranks removed the names once they all held their ends
    return ranks, [torch.load(tmp / f"rank{r}.pt") for r in range(ranks)]


@pytest.mark.parametrize("case", range(len(_cases(2))), ids=[c.name for c in _cases(2)])
def test_every_rank_gets_the_single_process_output(run, case):
    ranks, results = run
    spec = _cases(ranks)[case]
    inputs = _inputs(spec, ranks, seed=case)
    whole = LocalExpertExecutor(_layers(spec.dtype), E, _backend(backend_name("auto", "cpu") if
                                                                  spec.backend == "auto" else "exact"))
    x, ids, w = (torch.cat(parts) for parts in zip(*inputs))
    expected = whole(spec.layer, x, ids, w).split(spec.tokens[:ranks])
    for rank, want in enumerate(expected):
        got = results[rank][spec.name]["out"]
        assert got.dtype == spec.dtype and got.shape == (spec.tokens[rank], D), (rank, got.dtype, got.shape)
        if spec.backend == "exact":
            assert torch.equal(got, want), (rank, (got.float() - want.float()).abs().max())
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(len(_cases(2))), ids=[c.name for c in _cases(2)])
def test_every_rank_takes_the_cases_path_with_its_capacity(run, case):
    """Fixed: R*C rows received, C from the step's bucket; variable: exactly the pairs routed to the rank."""
    ranks, results = run
    spec = _cases(ranks)[case]
    step = max(spec.tokens[:ranks])
    inputs = _inputs(spec, ranks, seed=case)
    owners = torch.tensor([r for r, group in enumerate(assign_experts(E, ranks)) for _ in group])
    routed = [int(sum((owners[ids] == rank).sum() for _, ids, _ in inputs)) for rank in range(ranks)]
    capacity = min((b for b in (*BUCKETS, MAX_TOKENS) if b >= step), default=0) * min(K, E // ranks)
    for rank in range(ranks):
        ((path, rows, valid),) = results[rank][spec.name]["dispatched"]
        assert path == spec.path, rank
        assert valid == routed[rank], rank
        assert rows == (ranks * capacity if path == "fixed" else routed[rank]), rank
    if spec.to_rank is not None and spec.path == "fixed":  # worst case: every row the last rank received is real
        assert routed[spec.to_rank] == ranks * capacity == ranks * MAX_TOKENS * K


def test_a_rank_refuses_a_step_larger_than_agreed_and_a_worker_with_other_experts(run):
    ranks, results = run
    for rank in range(ranks):
        refused = results[rank]["refused"]
        assert len(refused) == 2, refused
        assert "3 tokens on a step agreed at 2" in refused[0] and f"rank {rank} owns experts" in refused[1]


def test_without_an_exchange_a_call_is_unavailable_except_alone():
    """Before a unit's ranks meet (and after their group failed) a step must fail, not run half the experts; only
    an engine's warm-up runs alone, on this rank's experts."""
    from cluster.parallel.dispatch import UnavailableError

    experts = (0, 1, 2, 3)
    worker = ShardWorker(_layers(torch.float32, experts), E, TorchMoEBackend())
    executor = AllToAllExperts(None, worker)
    g = torch.Generator().manual_seed(4)
    x, ids = torch.randn(5, D, generator=g), torch.randint(0, E, (5, K), generator=g)
    weights = torch.rand(5, K, generator=g)
    with pytest.raises(UnavailableError, match="not connected"):
        executor(0, x, ids, weights)
    with executor.alone():
        alone = executor(1, x, ids, weights)
    local = LocalExpertExecutor(_layers(torch.float32, experts), E, TorchMoEBackend())
    torch.testing.assert_close(alone, local(1, x, ids, weights), rtol=0, atol=0)
    executor.drop("the group failed")
    with pytest.raises(UnavailableError, match="the group failed"):
        executor(0, x, ids, weights)
