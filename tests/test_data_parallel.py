"""Data-parallel attention on the CPU (`cluster.engine.data_parallel`): two engines in two processes, each with its
own requests and KV cache and half of the experts, stepping together over a gloo all-to-all. Each request's tokens
(greedy and seeded) equal those one engine holding every expert gives it, while one rank idles through most steps.

Both sides run each expert as one fp32 matmul per expert (the torch backend, unbatched), so what differs is only
which rows share a matmul: the tokens must be equal."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cluster.config import ModelConfig
from cluster.engine.config import EngineConfig
from cluster.engine.data_parallel import DataParallelRank
from cluster.engine.engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.model.loader import load_model
from cluster.moe.executor import LocalExpertExecutor
from cluster.moe.torch_backend import TorchMoEBackend
from cluster.parallel.all_to_all import AllToAllExperts, ExpertAllToAll
from cluster.parallel.placement import assign_experts
from cluster.parallel.shard_worker import ShardWorker
from tests.ranks import run_ranks

RANKS = 2
JOIN_TIMEOUT_S = 180.0


def _requests() -> list[list[tuple[str, list[int], SamplingParams]]]:
    """Each rank's requests: rank 0 has three, rank 1 one short one (it idles while rank 0 goes on)."""
    g = torch.Generator().manual_seed(7)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, 32768, (n,), generator=g).tolist()

    greedy = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    return [[("a", prompt(20), greedy), ("b", prompt(35), seeded), ("c", prompt(6), greedy)],
            [("d", prompt(12), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))]]


def _exact() -> TorchMoEBackend:
    backend = TorchMoEBackend()
    backend.batched_max_rows = 0  # one matmul per expert, whatever the rows
    return backend


def _engine(model, tok, **kw) -> LLMEngine:
    return LLMEngine(model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=64 << 20, **kw))


def _tokens(outs) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for out in outs:
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens


def _rank_main(rank: int, model_dir: str, init_file: str, out_dir: str, async_scheduling: bool,
               buckets: bool) -> None:
    from cluster.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=60))
    try:
        config = ModelConfig.from_file(model_dir)
        model = load_model(model_dir, "fp32").model
        exchange = ExpertAllToAll(None, config.num_experts, config.experts_per_token, max_tokens=8)
        layers = ShardWorker.load(model_dir, config, tuple(assign_experts(config.num_experts, RANKS)[rank]),
                                  torch.float32, "cpu", backend="torch").layers
        experts = AllToAllExperts(exchange, ShardWorker(layers, config.num_experts, _exact()))
        model.attach_experts(experts)
        engine = _engine(model, load_tokenizer("v3"), async_scheduling=async_scheduling)
        if buckets:  # decode steps padded as CUDA graphs replay them (eagerly here): a padded step agrees its rows
            engine.runner.decode_buckets = (1, 2, 4, 8)
        padding = {"steps": 0}
        run_padding = engine.runner.run_padding

        def counted() -> None:
            padding["steps"] += 1
            run_padding()

        engine.runner.run_padding = counted
        for request_id, prompt, params in _requests()[rank]:
            engine.add_request(request_id, prompt, params)
        rank_of = DataParallelRank(engine, experts, control=dist.new_group(backend="gloo") if buckets else None)
        torch.save({"tokens": _tokens(rank_of.run()), "padding_steps": padding["steps"]},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process(tiny_dir, tok) -> dict[str, list[int]]:
    """Every request in one engine holding every expert."""
    loaded = load_model(tiny_dir, "fp32")
    config = loaded.model.config
    layers = ShardWorker.load(tiny_dir, config, tuple(range(config.num_experts)), torch.float32, "cpu",
                              backend="torch").layers
    loaded.model.attach_experts(LocalExpertExecutor(layers, config.num_experts, _exact()))
    engine = _engine(loaded.model, tok)
    for request_id, prompt, params in [r for rank in _requests() for r in rank]:
        engine.add_request(request_id, prompt, params)
    outs = []
    while engine.has_work():
        outs += engine.step()
    return _tokens(outs)


@pytest.mark.parametrize("async_scheduling, buckets", [(False, False), (True, False), (True, True)],
                         ids=["in-series", "ahead", "ahead-buckets"])
def test_each_rank_gets_the_single_process_tokens(tiny_dir, tmp_path, single_process, async_scheduling, buckets):
    """ahead-buckets: decode steps padded to buckets, and the per-step agreements on a group of their own."""
    run_ranks(_rank_main, (str(tiny_dir), str(tmp_path / "init"), str(tmp_path), async_scheduling, buckets),
              RANKS, JOIN_TIMEOUT_S)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(RANKS)]
    for rank, requests in enumerate(_requests()):
        assert results[rank]["tokens"] == {rid: single_process[rid] for rid, _, _ in requests}, rank
    assert results[1]["padding_steps"] >= 10 and results[0]["padding_steps"] == 0  # rank 1 idled through rank 0's


def _failing_rank_main(rank: int, model_dir: str, init_file: str, out_dir: str) -> None:
    """Rank 1's third forward raises (as an out-of-memory error would): it must leave the group, so rank 0's
    collectives fail at once instead of pairing with another call or waiting out the group's timeout."""
    import asyncio
    import time

    from cluster.engine.async_engine import AsyncEngine
    from cluster.parallel.rank_group import RankGroup
    from cluster.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=60))
    config = ModelConfig.from_file(model_dir)
    model = load_model(model_dir, "fp32").model
    worker = ShardWorker.load(model_dir, config, tuple(assign_experts(config.num_experts, RANKS)[rank]),
                              torch.float32, "cpu", backend="torch")
    experts = AllToAllExperts(None, worker)
    model.attach_experts(experts)
    engine = _engine(model, load_tokenizer("v3"))
    if rank == 1:
        run, calls = engine.runner.run, {"n": 0}

        def failing(batch):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("out of memory (planted)")
            return run(batch)

        engine.runner.run = failing
    lockstep = DataParallelRank(engine, experts)
    lockstep.connect(ExpertAllToAll(None, config.num_experts, config.experts_per_token, 0), None,
                     RankGroup(None, None))
    front = AsyncEngine(lambda: engine, lambda _: lockstep)

    async def ask() -> tuple[list, float]:
        t0 = time.monotonic()
        outs = [out async for out in await front.add_request(f"r{rank}", [5, 6, 7, 8],
                                                            SamplingParams(max_tokens=200, temperature=0,
                                                                           ignore_eos=True))]
        return [(o.finish_reason, o.error_status, len(o.token_ids)) for o in outs], time.monotonic() - t0

    outs, elapsed = asyncio.run(ask())
    torch.save({"last": outs[-1], "elapsed": elapsed, "connected": lockstep.connected},
               Path(out_dir) / f"failing{rank}.pt")
    front.shutdown()


def test_a_step_failing_on_one_rank_takes_every_rank_out_of_the_group_at_once(tiny_dir, tmp_path):
    run_ranks(_failing_rank_main, (str(tiny_dir), str(tmp_path / "init"), str(tmp_path)), RANKS, JOIN_TIMEOUT_S)
    results = [torch.load(tmp_path / f"failing{r}.pt") for r in range(RANKS)]
    assert results[1]["last"][:2] == ("error", 500)  # its own step failed
    assert results[0]["last"][:2] == ("error", 503)  # cut off: the group is gone
    assert all(r["elapsed"] < 30 and not r["connected"] for r in results), results  # well within the 60 s timeout
