"""A data-parallel unit on Ray (`cluster.serve.dp_unit`): two attention ranks, each its own process with its own
requests, KV cache and half of the experts, exchanging tokens over shared memory or gloo, behind the AttentionRouter
replica.

Every request's greedy and seeded tokens equal what one process holding every expert generates; a killed rank ends
its streams and its peer's with 503 errors, new requests get 503 within a second, and the unit comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import time

import pytest
import torch

from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.serve.args import ServeArgs
from cluster.serve.engine_builder import build_engine, in_process_executor
from cluster.serve.resolved import resolve
from tests.test_expert_parallel import _drive
from tests.waiting import wait_until

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
LONG = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
RANKS = 2
_IDS = itertools.count()


def _prompts(count: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 70, (count,), generator=g)
    return [torch.randint(3, 32768, (int(n),), generator=g).tolist() for n in lengths]


def _args(tiny_dir, **kw) -> ServeArgs:
    return ServeArgs(model=str(tiny_dir), shards=RANKS, device="cpu", dtype="fp32", kv_cache_bytes=2**24,
                     max_num_batched_tokens=48, replica_cpus=0.5, step_timeout_s=20, recovery_timeout_s=120,
                     stream_interval_s=0, **kw)


@pytest.fixture(scope="module")
def reference(tiny_dir) -> dict[str, dict[str, list[int]]]:
    """What one process generates for the test prompts, greedy and seeded."""
    args = resolve(_args(tiny_dir).model_copy(update={"shards": 1}))
    results = {}
    for name, params in (("greedy", GREEDY), ("seeded", SEEDED)):
        engine = build_engine(args, in_process_executor(args))
        results[name] = _drive(engine, _prompts(12), params)
    return results


@pytest.fixture(scope="module", params=["shm", "gloo"])
def router(request, local_ray, tiny_dir):
    """The replica of a unit whose ranks exchange over shared memory (`auto` on one machine) or gloo."""
    from cluster.serve.router import AttentionRouter

    replica = AttentionRouter(_args(tiny_dir, attention_ranks=RANKS,
                                    channel="auto" if request.param == "shm" else request.param))
    assert replica.ranks.backend == request.param
    yield replica
    replica.ranks.close()


async def _ask(router, prompt: list[int], params: SamplingParams,
               decoding: asyncio.Event | None = None) -> list[RequestOutput]:
    """One request through the replica -> its outputs, in order; `decoding` is set once it has two tokens."""
    outputs = []
    async for batch in router.generate(f"r{next(_IDS)}", prompt, params):
        outputs.extend(batch)
        if decoding is not None and len(_tokens(outputs)) >= 2:
            decoding.set()
    return outputs


def _recovered(unit) -> bool:
    """Whether the unit serves again after a recovery; fails at once if it gave up."""
    health = unit.health()
    assert health.status != "failed", health.detail
    return health.status == "ok" and unit.recoveries > 0


def _tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


async def _ask_all(router, prompts: list[list[int]], params: SamplingParams) -> list[list[RequestOutput]]:
    return list(await asyncio.gather(*(_ask(router, p, params) for p in prompts)))


def test_the_ranks_generate_the_single_process_tokens(router, reference):
    unit = router.ranks
    info = unit.shard_info()
    assert [i["rank"] for i in info] == [0, 1] and all(i["connected"] for i in info)
    assert sorted(e for i in info for e in i["experts"]) == list(range(8))
    assert len({i["pid"] for i in info} | {os.getpid()}) == RANKS + 1  # each rank its own process
    picks: list[int] = []
    pick = unit.pick
    unit.pick = lambda *a: picks.append(pick(*a)) or picks[-1]  # record where each request goes
    try:
        for name, params in (("greedy", GREEDY), ("seeded", SEEDED)):
            outputs = asyncio.run(_ask_all(router, _prompts(12), params))
            assert [_tokens(o) for o in outputs] == [reference[name][str(i)] for i in range(12)], name
            assert all(o[-1].finish_reason == "length" for o in outputs)
    finally:
        unit.pick = pick
    assert sorted(set(picks)) == [0, 1] and abs(picks.count(0) - picks.count(1)) <= 2  # spread over both ranks
    assert unit.in_flight == [0, 0]


def test_a_shared_prefix_goes_to_the_rank_that_caches_it(router):
    """Each rank has its own prefix cache: a prompt sharing 4 full blocks with an earlier one goes to the rank that
    ran it and finds them cached, where spreading by load alone would take the other rank (idle ranks are taken in
    turn)."""
    unit = router.ranks
    prefix = (_prompts(1, seed=21)[0] * 4)[:64]  # 4 full blocks of 16
    params = dataclasses.replace(GREEDY, max_tokens=2)

    async def run() -> list[list[RequestOutput]]:
        return [await _ask(router, prefix + tail, params) for tail in ([11, 12], [13, 14, 15])]

    picks: list[int] = []
    pick = unit.pick
    unit.pick = lambda *a: picks.append(pick(*a)) or picks[-1]
    try:
        first, second = asyncio.run(run())
    finally:
        unit.pick = pick
    assert picks[1] == picks[0]
    assert first[-1].cached_prompt_tokens == 0 and second[-1].cached_prompt_tokens == 64


def test_a_killed_rank_fails_its_streams_then_new_requests_fast_then_the_unit_recovers(router, reference):
    unit = router.ranks
    victim = unit.shard_info()[1]["pid"]

    async def scenario() -> tuple[list[list[RequestOutput]], float, list[RequestOutput]]:
        decoding = [asyncio.Event() for _ in range(4)]
        long = [asyncio.ensure_future(_ask(router, p, LONG, d)) for p, d in zip(_prompts(4, seed=9), decoding)]
        await asyncio.gather(*(d.wait() for d in decoding))  # every stream is decoding
        assert unit.in_flight == [2, 2]  # on both ranks
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        refused: list[RequestOutput] = []
        while not refused or refused[-1].error_status != 503:
            refused = await _ask(router, [3, 4], GREEDY)
            assert time.monotonic() - killed < 1.0, refused
        return list(await asyncio.gather(*long)), time.monotonic() - killed, refused

    streams, refused_after, refused = asyncio.run(scenario())
    assert refused_after < 1.0 and refused[-1].finish_reason == "error", refused_after
    for outputs in streams:  # every stream, on either rank, ends with an error event, never a hang or a length
        assert (outputs[-1].finish_reason, outputs[-1].error_status) == ("error", 503), outputs[-1]
        assert len(_tokens(outputs)) < LONG.max_tokens
    wait_until(lambda: _recovered(unit), 120, lambda: f"the unit to recover: {unit.health()}")
    assert unit.shard_info()[1]["pid"] != victim  # Ray restarted it
    outputs = asyncio.run(_ask_all(router, _prompts(12), GREEDY))
    assert [_tokens(o) for o in outputs] == [reference["greedy"][str(i)] for i in range(12)]


def test_a_hung_rank_fails_the_steps_at_the_deadline_then_is_replaced(local_ray, tiny_dir, reference):
    """A rank that stops answering (SIGSTOP) fails its peer's steps at the group's timeout, not never; the unit finds
    its process still there, kills it, Ray restarts it, and the unit serves the single-process tokens again."""
    from cluster.serve.router import AttentionRouter

    step_timeout_s = 3.0
    router = AttentionRouter(_args(tiny_dir, attention_ranks=RANKS).model_copy(
        update={"step_timeout_s": step_timeout_s}))
    unit = router.ranks
    victim = unit.shard_info()[1]["pid"]
    try:
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        health = asyncio.run(router.health())  # within the Ingress's probe timeout (0.4 s), the stopped rank left out
        assert time.monotonic() - t0 < 0.4 and health.stats["ranks"][1] is None, health
        t0 = time.monotonic()
        outputs = asyncio.run(_ask_all(router, _prompts(4), GREEDY))
        elapsed = time.monotonic() - t0
        assert all((o[-1].finish_reason, o[-1].error_status) == ("error", 503) for o in outputs), outputs
        assert elapsed < step_timeout_s + 5, elapsed
        wait_until(lambda: _recovered(unit), 120, lambda: f"the unit to recover: {unit.health()}")
        assert unit.shard_info()[1]["pid"] != victim  # killed for hanging; Ray restarted it
        outputs = asyncio.run(_ask_all(router, _prompts(12), GREEDY))
        assert [_tokens(o) for o in outputs] == [reference["greedy"][str(i)] for i in range(12)]
    finally:
        try:
            os.kill(victim, signal.SIGCONT)  # if it is still there (a failed test): let Ray end it
        except ProcessLookupError:
            pass
        unit.close()
