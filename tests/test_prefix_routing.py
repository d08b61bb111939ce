"""Prefix-aware routing across serving units (cluster/serve/prefix_routing.py): its keys are the engine's prefix-cache
keys, its table is bounded and follows the replicas, its policy prefers the prefix's unit only while load allows;
and on a real Serve app, 2 units find as much of their prompts in the prefix cache as 1 unit does."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import httpx
import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter

from cluster.engine.block_manager import BlockManager
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import Sequence
from cluster.serve.args import ServeArgs
from cluster.serve.prefix_routing import PrefixAffinityRouter, PrefixTable, prefix_router_options, prompt_chain
from tests.asgi_client import on_standalone

BS = 16  # the engine's block size
DEPLOYMENT = DeploymentID("AttentionRouter", "moe-cluster")


# --- the keys and the table --------------------------------------------------------------------------------------

@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_the_chain_is_the_prefix_cache_keys_the_engine_registers(salt):
    prompt = list(range(100, 100 + 3 * BS + 5))  # 3 full blocks and a partial one
    blocks = BlockManager(num_blocks=8, block_size=BS)
    seq = Sequence(0, "r", 0, list(prompt), SamplingParams(cache_salt=salt))
    blocks.allocate(seq, len(prompt))
    seq.num_computed = len(prompt)
    blocks.register_full_blocks(seq)
    chain = prompt_chain(prompt, salt, BS, max_blocks=64)
    assert len(chain) == 3 and chain == seq.block_hashes
    assert set(chain) == set(blocks.cached)
    assert prompt_chain(prompt, salt, BS, max_blocks=2) == chain[:2]
    assert prompt_chain(prompt[:BS - 1], salt, BS, max_blocks=64) == []  # no full block: nothing to route by


def test_requests_with_other_salts_share_no_key():
    prompt = list(range(4 * BS))
    chains = [prompt_chain(prompt, salt, BS, 64) for salt in (None, "a", "b")]
    assert all(len(c) == 4 for c in chains)
    assert not set(chains[0]) & set(chains[1]) and not set(chains[1]) & set(chains[2])


def test_the_table_finds_the_deepest_serving_holder_and_stays_bounded():
    table: PrefixTable[str] = PrefixTable(max_entries=6)
    system = prompt_chain(list(range(3 * BS)), None, BS, 64)
    long = prompt_chain(list(range(3 * BS)) + [7] * (2 * BS), None, BS, 64)  # the system prompt, then 2 more
    table.record(system, "a")
    table.record(long, "b")  # its first 3 keys are the system prompt's: b took them last
    assert table.longest_match(long, {"a", "b"}) == (5, "b")
    assert table.longest_match(system, {"a", "b"}) == (3, "b")
    assert table.longest_match(long, {"a"}) == (0, None)  # b is gone, and b was the system prompt's last holder
    other = prompt_chain([9] * (2 * BS), None, BS, 64)
    assert table.longest_match(other, {"a", "b"}) == (0, None)
    table.record(other, "a")  # 7 keys in all: the least recently recorded (the system prompt's first) goes
    assert len(table) == 6 and table.longest_match(system, {"b"}) == (3, "b")  # its deepest key still stands
    table.record(prompt_chain([8] * (2 * BS), None, BS, 64), "c")  # the system prompt's last two keys go too
    assert len(table) == 6 and table.longest_match(system, {"b"}) == (0, None)
    assert table.longest_match(long, {"b"}) == (5, "b")
    table.forget({"b"})
    assert len(table) == 4 and table.longest_match(long, {"a", "b"}) == (0, None)
    assert table.longest_match(other, {"a"}) == (2, "a")


def test_the_app_routes_the_attention_router_by_prefix_only_with_prefix_caching():
    options = prefix_router_options(ServeArgs(max_num_seqs=64))
    config = options["request_router_config"]
    assert config["request_router_class"] == "cluster.serve.prefix_routing.PrefixAffinityRouter"
    assert config["request_router_kwargs"] == {"block_size": BS, "imbalance_threshold": 32}
    assert prefix_router_options(ServeArgs(prefix_routing=False)) == {}
    assert prefix_router_options(ServeArgs(enable_prefix_caching=False)) == {}


# --- the policy, on replicas faked after the interface Serve's router uses -------------------------------------------

@dataclass(eq=False)  # hashed by identity, as Serve's replica wrappers are
class FakeReplica:
    name: str
    queue_len: int = 0
    max_ongoing_requests: int = 1024
    node_id: str = "node"
    availability_zone: str | None = None
    multiplexed_model_ids: set[str] = field(default_factory=set)
    routing_stats: dict = field(default_factory=dict)

    @property
    def replica_id(self) -> ReplicaID:
        return ReplicaID(self.name, DEPLOYMENT)

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def make_router(cls: type[RequestRouter], replicas: list[FakeReplica], **kwargs) -> RequestRouter:
    """A router as Serve builds one in a caller's process (call inside a running event loop)."""
    router = cls(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.REPLICA,
                 use_replica_queue_len_cache=True, self_node_id="node", prefer_local_node_routing=False)
    router.initialize_state(**kwargs)
    router.update_replicas(replicas)
    return router


def load(router: RequestRouter, replica: FakeReplica, queue_len: int) -> None:
    """The replica's queue length, as its answers to probes and the router's cache know it."""
    replica.queue_len = queue_len
    router.on_new_queue_len_info(replica.replica_id, queue_len)


_ids = iter(range(10**9))


def generate(prompt: list[int], salt: str | None = None, method: str = "generate",
             http_request: str | None = None) -> PendingRequest:
    """A pending call as the Ingress makes it: generate(request_id, prompt, params, stream); the calls made while
    serving one HTTP request share its internal request id."""
    rid = f"r{next(_ids)}"
    metadata = RequestMetadata(request_id=rid, internal_request_id=http_request or rid, call_method=method)
    return PendingRequest(args=[rid, prompt, SamplingParams(cache_salt=salt), True], kwargs={}, metadata=metadata)


def names(ranks) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_a_prompt_goes_first_to_the_unit_that_took_its_prefix():
    async def run():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router(PrefixAffinityRouter, [a, b], block_size=BS)
        system = list(range(1000, 1000 + 4 * BS))
        first = generate(system + [1, 2, 3])
        assert len((await router.choose_replicas([a, b], first))[0]) == 2  # nothing known: power of two choices
        router.on_request_routed(first, b.replica_id, None)
        assert names(await router.choose_replicas([a, b], generate(system + [4] * 20))) == [["b"], ["a"]]
        # Another salt, another chain; a prompt without a full block; another method: no preference.
        for request in (generate(system + [4], salt="other"), generate(system[:BS - 1]),
                        generate(system + [4], method="health")):
            assert sorted(names(await router.choose_replicas([a, b], request))[0]) == ["a", "b"]
        # A match that covers little of a long prompt (min_match 0.25): no preference.
        short = generate(system[:BS] + list(range(5000, 5000 + 5 * BS)))
        assert sorted(names(await router.choose_replicas([a, b], short))[0]) == ["a", "b"]

    asyncio.run(run())


def test_a_busy_holder_is_passed_over_and_the_prefix_follows_the_load():
    async def run():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router(PrefixAffinityRouter, [a, b], block_size=BS, imbalance_threshold=4)
        system = list(range(1000, 1000 + 4 * BS))
        router.on_request_routed(generate(system), a.replica_id, None)
        load(router, a, 4)  # 4 more than b: still a
        assert names(await router.choose_replicas([a, b], generate(system + [5])))[0] == ["a"]
        load(router, a, 5)  # 5 more: both, and Serve takes the shorter queue
        spilled = generate(system + [6])
        assert sorted(names(await router.choose_replicas([a, b], spilled))[0]) == ["a", "b"]
        router.on_request_routed(spilled, b.replica_id, None)
        load(router, a, 0)
        assert names(await router.choose_replicas([a, b], generate(system + [7])))[0] == ["b"]  # b has it now

    asyncio.run(run())


def test_replicas_that_leave_drop_out_of_the_table():
    async def run():
        a, b, c = FakeReplica("a"), FakeReplica("b"), FakeReplica("c")
        router = make_router(PrefixAffinityRouter, [a, b, c], block_size=BS)
        prompts = {r: [ord(r.name)] * (2 * BS) for r in (a, b, c)}
        for replica, prompt in prompts.items():
            router.on_request_routed(generate(prompt), replica.replica_id, None)
        assert len(router.table) == 6
        router.update_replicas([a, c])  # b scaled down
        assert len(router.table) == 4
        router.on_replica_actor_died(c.replica_id)
        assert len(router.table) == 2
        ranks = await router.choose_replicas([a], generate(prompts[b]))
        assert names(ranks) == [["a"]]  # only a remains: b's prefix is routed as any other
        assert names(await router.choose_replicas([a], generate(prompts[a] + [1]))) == [["a"]]

    asyncio.run(run())


def test_the_calls_of_one_http_request_each_get_the_replica_chosen_for_them():
    """Through Serve's routing loop: a completion of several prompts makes one call per prompt, all with the HTTP
    request's internal id; each is given a replica (Serve's own lookup by that id gives one and starves the rest),
    and the one chosen for its own prompt."""
    async def run():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router(PrefixAffinityRouter, [a, b], block_size=BS)
        prompts = {r.name: [ord(r.name)] * (3 * BS) for r in (a, b)}
        for replica in (a, b):
            router.on_request_routed(generate(prompts[replica.name]), replica.replica_id, None)
        calls = [generate(prompts[name] + [1], http_request="http-1") for name in "baba"]
        chosen = await asyncio.wait_for(asyncio.gather(*(router._choose_replica_for_request(c) for c in calls)), 10)
        assert [r.replica_id.unique_id for r in chosen] == list("baba")

    asyncio.run(run())


def simulated_hit_rate(cls: type[RequestRouter], waves: list[list[list[int]]]) -> float:
    """Hit rate of the workload on 2 fake units, each a prefix cache of unbounded size, routed by `cls` as Serve's
    routing loop would: the first rank with the shortest queue (ties: the rank's first); queues empty between
    waves."""
    async def run() -> float:
        units = [FakeReplica("a"), FakeReplica("b")]
        cached: dict[str, set[bytes]] = {u.name: set() for u in units}
        router = make_router(cls, units, **({"block_size": BS} if cls is PrefixAffinityRouter else {}))
        hits = queried = 0
        for wave in waves:
            for u in units:
                router.on_new_queue_len_info(u.replica_id, 0)
            for prompt in wave:
                request = generate(prompt)
                rank = (await router.choose_replicas(units, request))[0]
                unit = min(rank, key=lambda r: router.replica_queue_len_cache.get(r.replica_id) or 0)
                router.on_send_request(unit.replica_id)
                router.on_request_routed(request, unit.replica_id, None)
                chain = prompt_chain(prompt, None, BS, len(prompt))
                found = next((i for i, key in enumerate(chain) if key not in cached[unit.name]), len(chain))
                hits, queried = hits + found * BS, queried + len(prompt)
                cached[unit.name].update(chain)
        return hits / queried

    return asyncio.run(run())


def test_in_simulation_two_choices_miss_what_prefix_routing_finds():
    """The policy alone, deterministic (Serve's two choices draw from `random`, seeded by conftest): the default
    router scatters each system prompt over both units; prefix routing keeps each on one."""
    waves = workload(random.Random(1))
    ideal = ideal_hit_rate(waves)
    assert simulated_hit_rate(PrefixAffinityRouter, waves) == pytest.approx(ideal)
    assert simulated_hit_rate(PowerOfTwoChoicesRequestRouter, waves) < 0.8 * ideal


# --- the workload, and the goal on a real Serve app -------------------------------------------------------------

def workload(rng: random.Random, prompts: int = 8, turns: int = 3, system_blocks: int = 5) -> list[list[list[int]]]:
    """Waves of prompts (token ids): wave t holds a user turn after each of `prompts` system prompts of
    `system_blocks` full blocks, in a shuffled order; user turns are 8..40 tokens."""
    systems = [[rng.randrange(100, 30000) for _ in range(system_blocks * BS)] for _ in range(prompts)]
    waves = []
    for _ in range(turns):
        wave = [system + [rng.randrange(100, 30000) for _ in range(rng.randint(8, 40))] for system in systems]
        rng.shuffle(wave)
        waves.append(wave)
    return waves


def ideal_hit_rate(waves: list[list[list[int]]]) -> float:
    """One cache big enough for everything: each prompt finds the full blocks it shares with any earlier wave's
    (the engine always computes a prompt's last token, so at most its first len - 1 tokens)."""
    seen: set[bytes] = set()
    hits = queried = 0
    for wave in waves:
        for prompt in wave:
            chain = prompt_chain(prompt[:-1], None, BS, len(prompt))
            hits += BS * next((i for i, key in enumerate(chain) if key not in seen), len(chain))
            queried += len(prompt)
        seen.update(key for prompt in wave for key in prompt_chain(prompt, None, BS, len(prompt)))
    return hits / queried


async def send_waves(client: httpx.AsyncClient, waves: list[list[list[int]]]) -> tuple[int, int]:
    """(cached prompt tokens, prompt tokens) over the workload sent to /v1/completions, a wave at a time (its
    prompts at once), one token each."""
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    cached = prompt_tokens = 0
    for wave in waves:
        bodies = [{"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0} for prompt in wave]
        for r in await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies)):
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            prompt_tokens += usage["prompt_tokens"]
    return cached, prompt_tokens


def serve_args(model_dir, units: int, prefix_routing: bool = True) -> ServeArgs:
    """A cheap unit: the tiny dense checkpoint, no expert shards, a KV cache far larger than the workload."""
    return ServeArgs(model=str(model_dir), shards=0, units=units, ingress_replicas=1, dtype="fp32",
                     kv_cache_bytes=2**24, replica_cpus=0.5, prefix_routing=prefix_routing)


def one_unit_hit_rate(args: ServeArgs, waves: list[list[list[int]]]) -> float:
    """The workload on one unit: the single-process app (`--no-ray`), the same engine and prefix cache."""
    cached, prompt_tokens = on_standalone(args.model_copy(update={"units": 1}), lambda c: send_waves(c, waves))
    return cached / prompt_tokens


def test_two_units_find_as_much_in_the_prefix_cache_as_one(local_ray, tiny_dense_dir):
    from ray import serve

    from cluster.parallel.channel import free_port
    from cluster.serve.app import build_app
    from cluster.serve.local_ray import APP_NAME

    waves = workload(random.Random(0))
    args = serve_args(tiny_dense_dir, units=2)
    one_unit = one_unit_hit_rate(args, waves)
    assert one_unit == pytest.approx(ideal_hit_rate(waves)) and one_unit > 0.4

    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    try:
        async def run(work):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                return await work(client)

        cached, prompt_tokens = asyncio.run(run(lambda client: send_waves(client, waves)))
        units = unit_stats(serve.get_deployment_handle("AttentionRouter", APP_NAME))
        # One request, one routed call per prompt, all sharing the HTTP request's id in Serve: each is answered.
        several = asyncio.run(run(lambda client: client.post("/v1/completions", json={
            "model": tiny_dense_dir.name, "prompt": [w[0] for w in waves], "max_tokens": 1})))
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
    two_units = cached / prompt_tokens
    assert two_units >= 0.9 * one_unit, (two_units, one_unit)
    # Both units served (the prefixes were spread, not pinned on one), and their engines counted what the responses
    # said.
    assert len(units) == 2 and all(s["prefix_query_tokens"] > 0 for s in units.values()), units
    assert sum(s["prefix_query_tokens"] for s in units.values()) == prompt_tokens
    assert sum(s["prefix_hit_tokens"] for s in units.values()) == cached
    assert several.status_code == 200 and len(several.json()["choices"]) == len(waves), several.text


def unit_stats(router, probes: int = 64) -> dict[int, dict]:
    """Each AttentionRouter replica's engine stats by process id, from `health` calls (Serve sends each to either
    replica; 64 probes miss one with probability 2**-63)."""
    stats = {}
    for _ in range(probes):
        health = router.health.remote().result(timeout_s=30)
        stats[health.stats["pid"]] = health.stats
        if len(stats) == 2:
            break
    return stats
