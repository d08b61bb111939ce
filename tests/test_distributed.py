"""Expert shards as Ray actors behind the token channel: same tokens as one process (every shard its own process,
or shard 0 in the replica's process as on GPUs), loss, hang and recovery."""

import asyncio
import dataclasses
import itertools
import os
import signal
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from cluster.config import ModelConfig
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.parallel.channel import ChannelSpec, ReplicaChannel
from cluster.parallel.dispatch import RoutedBatch, UnavailableError
from cluster.parallel.layout import UnitLayout
from cluster.parallel.shard_worker import ShardWorker
from cluster.parallel.shm_channel import ShmReplicaChannel, create_files, shm_directory
from cluster.serve.args import ServeArgs
from cluster.serve.engine_builder import build_engine, in_process_executor
from cluster.serve.resolved import ResolvedArgs, resolve
from tests.test_expert_parallel import _drive

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)


def _prompts(count: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 70, (count,), generator=g)
    return [torch.randint(3, 32768, (int(n),), generator=g).tolist() for n in lengths]


def _args(tiny_dir, shards: int, layout: UnitLayout | None = None, **kw) -> ResolvedArgs:
    """The unit's resolved settings on CPU; `layout` replaces the CPU one (to run the GPU layout here)."""
    resolved = resolve(ServeArgs(model=str(tiny_dir), shards=shards, device="cpu", dtype="fp32", kv_cache_bytes=2**24,
                         max_num_batched_tokens=48, shard_cpus=0.5, **kw))
    return dataclasses.replace(resolved, layout=layout) if layout else resolved


# The test thread plays the engine thread: the supervisor's transport swaps and the test's calls take turns, as
# they do on a real engine thread (a close racing a step would stop a live shard mid-round).
_ENGINE_TURN = threading.Lock()


def _run_now(fn) -> Future:
    done: Future = Future()
    with _ENGINE_TURN:
        done.set_result(fn(None))
    return done


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """What one process generates for the test prompts, greedy and seeded."""
    args = _args(tiny_dir, 1)
    results = {}
    for name, params in (("greedy", GREEDY), ("seeded", SEEDED)):
        engine = build_engine(args, in_process_executor(args))
        results[name] = _drive(engine, _prompts(12), params)
    return results


@pytest.mark.parametrize("channel", ["shm", "gloo"])
@pytest.mark.parametrize("shards", [2, 4])
def test_distributed_engine_generates_the_single_process_tokens(local_ray, tiny_dir, reference, shards, channel):
    from cluster.serve.unit import ShardedUnit

    args = _args(tiny_dir, shards, channel=channel)
    unit = ShardedUnit(args)
    try:
        assert type(unit.executor.transport).__name__ == {"shm": "ShmReplicaChannel", "gloo": "ReplicaChannel"}[channel]
        info = unit.shard_info()
        assert sorted(e for i in info for e in i["experts"]) == list(range(8))
        assert len({i["pid"] for i in info} | {os.getpid()}) == shards + 1  # each shard its own process
        for name, params in (("greedy", GREEDY), ("seeded", SEEDED)):
            engine = build_engine(args, unit.executor)
            assert _drive(engine, _prompts(12), params) == reference[name], name
    finally:
        unit.close()


@pytest.mark.parametrize("backend,exact_sizes", [("gloo", False), ("gloo", True), ("shm", False)],
                         ids=["gloo-one-message", "gloo-header-then-body", "shm"])
def test_channel_frames_carry_batches_both_ways(local_ray, tiny_dir, backend, exact_sizes):
    """Every framing: gloo's one message into a capacity buffer, the header-first form NCCL needs, shared memory."""
    from cluster.parallel.channel import free_port

    import ray
    from cluster.serve.expert_shard import ExpertShard

    groups = [(0, 1, 2), (3, 4, 5, 6, 7)]
    actor = ray.remote(ExpertShard).options(num_cpus=0.5)
    config = ModelConfig.from_file(tiny_dir)
    shards = [actor.remote(str(tiny_dir), config, g, torch.float32, "cpu", "torch", 1) for g in groups]
    spec = ChannelSpec("127.0.0.1", free_port("127.0.0.1"), 2, config.hidden_size, 2, "fp32", max_rows=40,
                       backend=backend, exact_sizes=exact_sizes, path=shm_directory() if backend == "shm" else "")
    if backend == "shm":
        create_files(spec)
    joined = [s.connect.remote(spec, rank + 1) for rank, s in enumerate(shards)]
    channel = ShmReplicaChannel(spec) if backend == "shm" else ReplicaChannel(spec)
    ray.get(joined)
    assert not spec.path or not os.path.exists(spec.path)  # shm names are gone once both sides hold them
    local = [ShardWorker.load(tiny_dir, config, g, torch.float32, "cpu") for g in groups]
    g = torch.Generator().manual_seed(0)
    for layer, rows, shared in [(0, 1, False), (1, 40, False), (0, 17, True), (1, 0, False), (1, 5, True)]:
        batches = []
        for _ in groups:
            x = torch.randn(rows, config.hidden_size, generator=g)
            ids = torch.randint(0, 8, (rows, 2), generator=g, dtype=torch.int32)
            batches.append(RoutedBatch(layer, x, ids, torch.rand(rows, 2, generator=g)) if rows else None)
        if shared:
            batches = [batches[0]] * len(groups)  # one batch for every shard: packed once
        for got, worker, batch in zip(channel.run(batches), local, batches):
            if batch is None:
                assert got is None
            else:
                torch.testing.assert_close(got, worker.run(batch), rtol=1e-6, atol=1e-6)
    channel.close()
    deadline = time.monotonic() + 10
    while any(ray.get([s.info.remote() for s in shards])[i]["serving"] for i in range(2)):
        assert time.monotonic() < deadline, "shards still serving a closed channel"
        time.sleep(0.1)
    assert all(i["last_exit"] == "stopped by the replica" for i in ray.get([s.info.remote() for s in shards]))
    for s in shards:
        ray.kill(s)


@pytest.mark.parametrize("channel", ["shm", "gloo"])
def test_a_killed_shard_fails_the_step_fast_then_the_unit_recovers(local_ray, tiny_dir, reference, channel):
    from cluster.serve.unit import ShardedUnit

    args = _args(tiny_dir, 2, recovery_timeout_s=120, channel=channel)
    unit = ShardedUnit(args)
    try:
        unit.supervise(_run_now)
        engine = build_engine(args, unit.executor)  # before the kill: building it runs steps (the cost probe)
        victim = unit.shard_info()[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            for _ in range(50):  # the step that meets the dead shard raises instead of hanging
                with _ENGINE_TURN:
                    unit.executor(0, torch.randn(4, 64), torch.tensor([[3, 5]] * 4, dtype=torch.int32),
                                  torch.full((4, 2), 0.5))
                time.sleep(0.1)
        assert time.monotonic() - t0 < 15
        deadline = time.monotonic() + 90
        while unit.health().status != "ok" or unit.recoveries == 0:
            assert unit.health().status != "failed", unit.health().detail
            assert time.monotonic() < deadline, f"not recovered: {unit.health()}"
            time.sleep(0.2)
        assert unit.shard_info()[1]["pid"] != victim  # Ray restarted it in a new process
        assert _drive(engine, _prompts(12), GREEDY) == reference["greedy"]
    finally:
        unit.close()


# The GPU layout on CPU: shard 0 runs in the replica's process, the others are channel ranks 1..S-1.
def _in_replica(shards: int) -> UnitLayout:
    return UnitLayout("cpu", None, (None,) * shards, (None,) + tuple(range(1, shards)))


def test_one_shard_sharing_the_replicas_gpu_needs_no_channel(local_ray, tiny_dir, reference):
    from cluster.serve.unit import ShardedUnit

    args = _args(tiny_dir, 1, _in_replica(1), channel="gloo")
    unit = ShardedUnit(args)
    try:
        assert type(unit.executor.transport).__name__ == "InProcessTransport" and not unit.actors
        assert _drive(build_engine(args, unit.executor), _prompts(12), GREEDY) == reference["greedy"]
    finally:
        unit.close()


@pytest.mark.parametrize("shards", [2, 3])
def test_a_shard_in_the_replica_process_beside_channel_shards_generates_the_single_process_tokens(
        local_ray, tiny_dir, reference, shards):
    from cluster.serve.unit import ShardedUnit

    args = _args(tiny_dir, shards, _in_replica(shards), channel="gloo")
    unit = ShardedUnit(args)
    try:
        assert type(unit.executor.transport).__name__ == "HybridTransport"
        assert unit.executor.transport.remote.num_shards == shards - 1  # the channel connects only the others
        info = unit.shard_info()
        assert [i["channel_rank"] for i in info] == [None] + list(range(1, shards))
        assert info[0]["pid"] == os.getpid() and len({i["pid"] for i in info}) == shards
        assert sorted(e for i in info for e in i["experts"]) == list(range(8))
        for name, params in (("greedy", GREEDY), ("seeded", SEEDED)):
            engine = build_engine(args, unit.executor)
            assert _drive(engine, _prompts(12), params) == reference[name], name
    finally:
        unit.close()


_REQUEST_IDS = itertools.count()


def _ask(engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
    """The requests sent together through the async engine (as the replica runs them) -> each one's last output."""
    async def one(prompt: list[int]) -> RequestOutput:
        outputs = [out async for out in await engine.add_request(f"r{next(_REQUEST_IDS)}", prompt, params)]
        return outputs[-1]

    async def every() -> list[RequestOutput]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(every())


@pytest.mark.parametrize("layout", ["own-process", "in-replica"])
def test_a_hung_shard_gives_503s_within_the_step_timeout_then_the_unit_recovers(local_ray, tiny_dir, reference,
                                                                                layout):
    """A shard that stops answering (SIGSTOP) fails the step at the deadline, not never; the unit kills it, Ray
    restarts it, and the unit serves the single-process tokens again."""
    from cluster.serve.unit import ShardedUnit

    step_timeout_s = 3.0
    args = _args(tiny_dir, 2, _in_replica(2) if layout == "in-replica" else None, channel="gloo",
                 step_timeout_s=step_timeout_s, recovery_timeout_s=120)
    unit = ShardedUnit(args)
    engine = AsyncEngine(lambda: build_engine(args, unit.executor))
    victim = unit.shard_info()[1]["pid"]
    try:
        unit.supervise(engine.call)
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        outputs = _ask(engine, _prompts(4), GREEDY)
        elapsed = time.monotonic() - t0
        assert [(o.finish_reason, o.error_status) for o in outputs] == [("error", 503)] * 4, outputs
        assert "missed" in outputs[0].error or "no reply" in outputs[0].error, outputs[0].error
        assert step_timeout_s <= elapsed < step_timeout_s + 5, elapsed
        deadline = time.monotonic() + 90
        while unit.health().status != "ok" or unit.recoveries == 0:
            assert unit.health().status != "failed", unit.health().detail
            assert time.monotonic() < deadline, f"not recovered: {unit.health()}"
            time.sleep(0.2)
        assert unit.shard_info()[1]["pid"] != victim  # killed for missing the deadline; Ray restarted it
        outputs = _ask(engine, _prompts(4), GREEDY)
        assert [(o.finish_reason, o.error) for o in outputs] == [("length", None)] * 4
    finally:
        try:
            os.kill(victim, signal.SIGCONT)  # if it is still there (a failed test): let Ray end it
        except ProcessLookupError:
            pass
        engine.shutdown()
    try:
        assert _drive(build_engine(args, unit.executor), _prompts(12), GREEDY) == reference["greedy"]
    finally:
        unit.close()


def test_recovery_waits_on_the_engine_thread_for_a_bounded_time():
    """A step holds the engine thread at most `step_timeout_s`; the supervisor gives up on a longer wait, and a call
    that failed on the engine thread does not end it."""
    from cluster.serve.unit import ShardedUnit

    unit = ShardedUnit.__new__(ShardedUnit)  # only the engine-thread calls, no shards
    unit._run_on_engine = lambda fn: Future()  # an engine thread that never takes the call
    t0 = time.monotonic()
    assert unit._on_engine(lambda _: None, 0.3) is False
    assert 0.3 <= time.monotonic() - t0 < 2
    unit._run_on_engine = _run_now
    assert unit._on_engine(lambda _: 1 / 0, 0.3) is True
