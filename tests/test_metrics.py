"""Metrics: the sinks and recorders, the expert counts on the device (padding and CUDA graphs), and live: the single
process's GET /metrics and the Ray metrics agent's export of a Serve app, scraped before and after traffic, move by
what the responses say; a killed shard counts as one recovery of its unit; every metric of this project that the Grafana
dashboard and the alert rules query is emitted, under the names k8s/monitoring's relabelling gives it (the rest of
k8s/monitoring: tests/test_monitoring.py). On Ray, the API's GET /metrics says where the metrics are.

Imports beyond torch and the core are made inside the tests: the GPU machine (no Ray, pydantic, starlette or
prometheus_client) runs the device tests of this file.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
import torch

from cluster.config import ModelConfig
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.model_runner import ModelRunner
from cluster.engine.paged_cache import PagedKVCache
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledSeq, SchedulerOutput
from cluster.engine.sequence import Sequence
from cluster.model.loader import load_model
from cluster.moe.load import ExpertLoad
from cluster.parallel.dispatch import ExpertParallelExecutor
from cluster.parallel.frames import ChannelSpec
from cluster.parallel.in_process import InProcessTransport
from cluster.parallel.placement import assign_experts, expert_owners
from cluster.parallel.shard_worker import ShardWorker
from tests.asgi_client import asgi_post
from tests.http import sse_line_chunks

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


# -- names and sinks -------------------------------------------------------------------------------------------------
def test_every_name_is_valid_unique_and_ray_safe():
    from cluster.metrics import names as mn

    prometheus = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
    assert len({s.name for s in mn.ALL}) == len(mn.ALL)
    for spec in mn.ALL:
        # prometheus_client appends a counter's `_total` itself; vLLM's histogram `iteration_tokens_total` has it
        assert prometheus.match(spec.name) and not (spec.kind == "counter" and spec.name.endswith("_total")), spec.name
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", spec.ray_name), spec.ray_name
        assert spec.name.startswith("vllm:") or spec.name.startswith("moe_cluster_"), spec.name
        assert spec.label_names[0] == "model_name"
        assert (spec.kind == "histogram") == bool(spec.buckets), spec.name
        assert list(spec.buckets) == sorted(set(spec.buckets)) and all(b > 0 for b in spec.buckets), spec.name
    assert mn.GENERATION_TOKENS.scraped_names(ray=False) == ("vllm:generation_tokens_total",)
    assert mn.ITERATION_TOKENS.scraped_names(ray=False)[0] == "vllm:iteration_tokens_total_bucket"
    assert mn.TTFT.scraped_names(ray=True) == ("ray_vllm_time_to_first_token_seconds_bucket",
                                               "ray_vllm_time_to_first_token_seconds_sum",
                                               "ray_vllm_time_to_first_token_seconds_count")
    assert mn.TTFT.exposed_label_names == ("model_name", "engine")
    assert mn.REQUEST_SUCCESS.exposed_label_names == ("model_name", "engine", "finished_reason")
    assert mn.EXPERT_TOKENS.exposed_label_names == mn.EXPERT_TOKENS.label_names == ("model_name", "layer", "expert")


# vLLM's (v1) published buckets for the histograms this project shares with it, as facts: the `le` values a vLLM
# dashboard selects, and what `sum by (le)` across this service and vLLM servers adds.
VLLM_LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                960.0, 1920.0, 7680.0)
VLLM_GAP = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_BUCKETS = {
    "vllm:time_to_first_token_seconds": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
    "vllm:inter_token_latency_seconds": VLLM_GAP,
    "vllm:request_time_per_output_token_seconds": VLLM_GAP,
    "vllm:e2e_request_latency_seconds": VLLM_LATENCY,
    "vllm:request_queue_time_seconds": VLLM_LATENCY,
    "vllm:request_inference_time_seconds": VLLM_LATENCY,
    "vllm:request_prefill_time_seconds": VLLM_LATENCY,
    "vllm:request_decode_time_seconds": VLLM_LATENCY,
    "vllm:request_params_n": (1, 2, 5, 10, 20),
    "vllm:iteration_tokens_total": (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
}


def _one_two_five(limit: int) -> tuple[int, ...]:
    """vLLM's token-count buckets for a context of `limit` tokens: 1, 2, 5, 10, ... up to `limit`."""
    return tuple(m * 10 ** e for e in range(10) for m in (1, 2, 5) if m * 10 ** e <= limit)


def test_histograms_vllm_also_has_use_vllms_buckets():
    from cluster.metrics import names as mn

    specs = {spec.name: spec for spec in mn.ALL}
    for name, buckets in VLLM_BUCKETS.items():
        assert specs[name].buckets == tuple(float(b) for b in buckets), name
    # Token counts: vLLM's 1-2-5 series up to the context; here up to the largest context served, 8x22B's.
    counts = _one_two_five(65536)
    assert counts[-3:] == (10000, 20000, 50000)
    for spec in (mn.REQUEST_PROMPT_TOKENS, mn.REQUEST_GENERATION_TOKENS, mn.REQUEST_PARAMS_MAX_TOKENS):
        assert spec.buckets == tuple(float(b) for b in counts), spec.name
    # Every histogram named vllm:* is one of those: a new one must say whose buckets it has.
    shared = set(VLLM_BUCKETS) | {s.name for s in (mn.REQUEST_PROMPT_TOKENS, mn.REQUEST_GENERATION_TOKENS,
                                                   mn.REQUEST_PARAMS_MAX_TOKENS)}
    assert {s.name for s in mn.ALL if s.kind == "histogram" and s.per_engine} == shared


def test_prometheus_sink_renders_each_kind_in_its_own_registry():
    from cluster.metrics import names as mn
    from cluster.metrics.prometheus_sink import PrometheusSink

    first, second = PrometheusSink(), PrometheusSink()  # two apps in one process
    first.series(mn.GENERATION_TOKENS, "m").inc(7)
    first.series(mn.RUNNING, "m").set(3)
    ttft = first.series(mn.TTFT, "m")
    for seconds in (0.004, 0.3, 0.3):
        ttft.observe(seconds)
    first.series(mn.EXPERT_TOKENS, "m", "1", "5").inc(0)
    got = _samples(first.render())
    engine = ("engine", "0")  # vLLM's metrics carry the single process's one engine
    assert got[("vllm:generation_tokens_total", (engine, ("model_name", "m")))] == 7
    assert got[("vllm:num_requests_running", (engine, ("model_name", "m")))] == 3
    assert got[("vllm:time_to_first_token_seconds_count", (engine, ("model_name", "m")))] == 3
    assert got[("vllm:time_to_first_token_seconds_bucket", (engine, ("le", "0.005"), ("model_name", "m")))] == 1
    assert got[("vllm:time_to_first_token_seconds_bucket", (engine, ("le", "0.25"), ("model_name", "m")))] == 1
    assert got[("vllm:time_to_first_token_seconds_bucket", (engine, ("le", "0.5"), ("model_name", "m")))] == 3
    assert got[("moe_cluster_expert_tokens_total", (("expert", "5"), ("layer", "1"), ("model_name", "m")))] == 0
    assert not any(name.endswith("_created") for name, _ in got)
    assert ("vllm:generation_tokens_total", (engine, ("model_name", "m"))) not in _samples(second.render())


def _out(index: int, tokens: int, finish: str | None = None, scheduled_at: float | None = None):
    from cluster.engine.outputs import RequestOutput

    return RequestOutput("r", index, "x", [1], completion_tokens=tokens, finish_reason=finish, prompt_tokens=9,
                         scheduled_at=scheduled_at)


def test_a_request_counts_its_prompt_once_and_every_choice_and_token():
    from cluster.metrics.prometheus_sink import PrometheusSink
    from cluster.metrics.recorder import RequestMetrics

    sink = PrometheusSink()
    metrics = RequestMetrics(sink, "m")
    arrival = time.monotonic()
    timer = metrics.request(9, SamplingParams(n=3, max_tokens=4), arrival)
    # choice 0: 3 tokens then stop; choice 1: 4 tokens, length; choice 2: one token, then the client leaves
    for tokens in (1, 2, 3):
        timer.output(_out(0, tokens))
    timer.output(_out(0, 3, "stop", arrival))
    for tokens in (1, 2, 3):
        timer.output(_out(1, tokens))
    timer.output(_out(1, 4, "length", arrival))
    timer.output(_out(2, 1))
    timer.close()
    timer.close()  # closing again records nothing more
    metrics.flush()
    got = _totals(sink.render())
    assert got["vllm:prompt_tokens_total"] == 9 and got["vllm:request_prompt_tokens_count"] == 1
    assert got["vllm:generation_tokens_total"] == 3 + 4 + 1
    assert got["vllm:request_generation_tokens_sum"] == 8 and got["vllm:request_generation_tokens_count"] == 3
    assert _by_reason(sink.render()) == {"stop": 1, "length": 1, "abort": 1, "error": 0}
    assert got["vllm:time_to_first_token_seconds_count"] == 3
    assert got["vllm:inter_token_latency_seconds_count"] == 2 + 3 + 0
    assert got["vllm:e2e_request_latency_seconds_count"] == 3
    assert got["vllm:request_queue_time_seconds_count"] == 2  # the aborted choice's first step is not known
    assert got["vllm:request_time_per_output_token_seconds_count"] == 2  # choices with a second token
    assert got["vllm:request_params_n_sum"] == 3 and got["vllm:request_params_max_tokens_sum"] == 4


def test_a_failed_choice_moves_only_the_error_count():
    """Choice 0 fails after two tokens (a unit lost mid-step), choice 1 ends normally: only the time to first token
    (taken at once, when each choice's first token came) sees choice 0; no other latency or per-choice token
    histogram does, and the tokens it generated were generated all the same."""
    from cluster.engine.outputs import RequestOutput
    from cluster.metrics.prometheus_sink import PrometheusSink
    from cluster.metrics.recorder import RequestMetrics

    sink = PrometheusSink()
    metrics = RequestMetrics(sink, "m")
    arrival = time.monotonic()
    timer = metrics.request(9, SamplingParams(n=2, max_tokens=4), arrival)
    for tokens in (1, 2):
        timer.output(_out(0, tokens))
        timer.output(_out(1, tokens))
    timer.output(RequestOutput("r", 0, "", [], finish_reason="error", completion_tokens=2, error="lost",
                               error_status=503))
    timer.output(_out(1, 3, "stop", arrival))
    timer.close()
    metrics.flush()
    got = _totals(sink.render())
    assert _by_reason(sink.render()) == {"stop": 1, "length": 0, "abort": 0, "error": 1}
    assert got["vllm:time_to_first_token_seconds_count"] == 2  # both choices had a first token
    for histogram in ("e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_inference_time_seconds", "request_prefill_time_seconds",
                      "request_decode_time_seconds", "request_time_per_output_token_seconds",
                      "request_generation_tokens"):
        assert got[f"vllm:{histogram}_count"] == 1, histogram  # choice 1's alone
    assert got["vllm:inter_token_latency_seconds_count"] == 2  # choice 1's two gaps
    assert got["vllm:request_generation_tokens_sum"] == 3
    assert got["vllm:generation_tokens_total"] == 2 + 3 and got["vllm:prompt_tokens_total"] == 9


def test_refused_requests_are_counted_by_status(model, tok):
    """An engine with room for one sequence, held busy: a request asking more choices than it allows is 400, one
    past its room 429, whether `generate` or the API's early check (`overloaded`) refuses it."""
    from cluster.serve.engine_backend import EngineBackend
    from cluster.engine.async_engine import AsyncEngine
    from cluster.engine.paged_cache import kv_bytes_per_block
    from cluster.metrics.engine_metrics import EngineMetrics
    from cluster.metrics.prometheus_sink import PrometheusSink

    short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    front = AsyncEngine(lambda: LLMEngine(model, tok.decode, tok.eos_id, EngineConfig(
        kv_cache_bytes=64 * kv_bytes_per_block(model.config, 16, torch.float32), max_num_seqs=1, max_waiting=0,
        max_n=2)))
    metrics = EngineMetrics(PrometheusSink(), "m", front)
    backend = EngineBackend(front, None, metrics)

    async def scenario() -> list:
        release = threading.Event()
        held = front.call(lambda engine: release.wait(30))
        try:
            admitted = asyncio.create_task(_finishes(backend.generate("a", [1, 2], short)))
            while front.in_flight == 0:  # it takes the one place
                await asyncio.sleep(0.001)
            outs = [o async for o in backend.generate("n3", [1, 2], SamplingParams(n=3, max_tokens=2))]
            outs += [o async for o in backend.generate("full", [1, 2], short)]
            assert backend.overloaded() is not None
        finally:
            release.set()
        held.result(timeout=30)
        assert await admitted == ["length"]
        return outs

    try:
        outs = asyncio.run(scenario())
        body, _ = metrics.render()
    finally:
        metrics.sampler.stop()
        front.shutdown()
    assert [(o.finish_reason, o.error_status) for o in outs] == [("error", 400)] * 3 + [("error", 429)]
    refused = {dict(ls)["status"]: v for (n, ls), v in _samples(body).items()
               if n == "moe_cluster_requests_refused_total"}
    assert refused == {"400": 1, "429": 2, "503": 0}
    assert _by_reason(body) == {"stop": 0, "length": 1, "abort": 0, "error": 0}  # the admitted request only


async def _finishes(outputs) -> list[str]:
    return [o.finish_reason async for o in outputs if o.finished]


def test_a_recovering_unit_shows_in_its_state(make_engine):
    from cluster.engine.async_engine import AsyncEngine
    from cluster.metrics.prometheus_sink import PrometheusSink
    from cluster.metrics.recorder import RequestMetrics
    from cluster.metrics.sampler import Sampler
    from cluster.health import Health

    front = AsyncEngine(make_engine)
    sink = PrometheusSink()
    try:
        Sampler(sink, "m", front, RequestMetrics(sink, "m"), 1.0, lambda: Health("recovering")).sample()
    finally:
        front.shutdown()
    states = {dict(ls)["state"]: v for (n, ls), v in _samples(sink.render()).items()
              if n == "moe_cluster_unit_state"}
    assert states == {"ok": 0, "recovering": 1, "failed": 0}


def test_waiting_counts_the_choices_not_yet_admitted(make_engine):
    from cluster.metrics.sampler import read_engine

    engine = make_engine()
    engine.add_request("n3", [5] * 20, SamplingParams(max_tokens=2, n=3, temperature=0, ignore_eos=True))
    stats = read_engine(engine, probe=False).stats
    assert (stats.running, stats.waiting) == (0, 3)  # choice 0 queued, choices 1 and 2 held back
    engine.step()  # choice 0's prefill: its siblings join the queue
    stats = read_engine(engine, probe=False).stats
    assert (stats.running, stats.waiting) == (1, 2)
    engine.abort("n3")


class _Reporting:
    """An engine seen only through what it reports about itself: reading anything else of it raises."""

    PUBLIC = frozenset({"stats", "expert_counts", "drain_step_tokens", "drain_shard_rounds", "probe_shards",
                        "has_work", "config", "kv_cache_dtype"})

    def __init__(self, engine: LLMEngine):
        self._engine = engine

    def __getattr__(self, name: str):
        if name not in self.PUBLIC:
            raise AttributeError(f"the sampler read engine.{name}, which is no part of what the engine reports")
        return getattr(self._engine, name)


def test_the_sampler_reads_only_what_the_engine_reports(tiny_dir, tok):
    """A unit's engine (two in-process shards) after a step, read through its reporting methods alone: the stats
    record, the expert counts, the steps' sizes, the shard rounds and the probe."""
    from cluster.engine.stats import EngineStats
    from cluster.metrics.sampler import read_engine

    model = load_model(tiny_dir, "fp32", "cpu").model
    config = model.config
    groups = assign_experts(config.num_experts, 2)
    workers = [ShardWorker.load(tiny_dir, config, g, torch.float32, "cpu", "auto") for g in groups]
    model.attach_experts(ExpertParallelExecutor(InProcessTransport(workers), expert_owners(groups)))
    engine = LLMEngine(model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=2**22, attention_backend="torch"))
    engine.add_request("r", [5] * 9, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    engine.step()
    facts = read_engine(_Reporting(engine), probe=True)
    assert isinstance(facts.stats, EngineStats) and facts.stats == engine.stats()
    assert (facts.stats.running, facts.stats.waiting, facts.stats.attention_kernel) == (0, 0, "torch")
    assert facts.step_tokens == [9] and len(facts.rounds) == config.num_layers
    assert [sum(row) for row in facts.expert_counts] == [9 * config.experts_per_token] * config.num_layers
    assert facts.probes is not None and len(facts.probes) == 2
    assert facts.cache_config == ("16", "float32", "True", "0.9", str(facts.stats.total_blocks))


def test_health_shows_the_stats_record_under_its_keys(make_engine):
    """`/health`'s stats: the engine's record, one key per field (the keys it always had), and the front's own."""
    from cluster.engine.async_engine import AsyncEngine
    from cluster.serve.engine_backend import EngineBackend

    front = AsyncEngine(lambda: make_engine(attention_backend="torch"))
    try:
        stats = asyncio.run(EngineBackend(front, moe_kernel="torch").health()).stats
        record = front.call(lambda e: e.stats()).result(timeout=10)
    finally:
        front.shutdown()
    assert set(stats) == {"running", "waiting", "free_blocks", "total_blocks", "preemptions", "prefix_hit_tokens",
                          "prefix_query_tokens", "prefix_collisions", "attention_kernel", "in_flight", "moe_kernel"}
    assert stats == {**record.as_dict(), "in_flight": 0, "moe_kernel": "torch"}
    assert (stats["total_blocks"], stats["free_blocks"], stats["attention_kernel"]) == (256, 256, "torch")


def test_each_step_and_the_cache_configuration_are_exported(model, tok):
    """vllm:iteration_tokens_total observes the tokens of every step, once (a 20-token prompt in chunks of 8, then
    two decodes); vllm:cache_config_info is 1 under the cache's settings, written as vLLM writes them."""
    from cluster.engine.async_engine import AsyncEngine
    from cluster.engine.paged_cache import kv_bytes_per_block
    from cluster.metrics.prometheus_sink import PrometheusSink
    from cluster.metrics.recorder import RequestMetrics
    from cluster.metrics.sampler import Sampler

    front = AsyncEngine(lambda: LLMEngine(model, tok.decode, tok.eos_id, EngineConfig(
        kv_cache_bytes=64 * kv_bytes_per_block(model.config, 16, torch.float32), max_num_batched_tokens=8)))
    sink = PrometheusSink()

    async def run() -> None:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        assert [o.finish_reason async for o in await front.add_request("r", list(range(5, 25)), params)][-1] == \
            "length"

    try:
        asyncio.run(run())
        sampler = Sampler(sink, "m", front, RequestMetrics(sink, "m"), 1.0)
        sampler.sample()
        sampler.sample()  # the steps were read once: a second sample adds none
    finally:
        front.shutdown()
    samples = _samples(sink.render())
    steps = {dict(ls)["le"]: v for (n, ls), v in samples.items() if n == "vllm:iteration_tokens_total_bucket"}
    assert (steps["1.0"], steps["8.0"], steps["16.0"], steps["+Inf"]) == (2, 5, 5, 5)
    assert _sum(samples, "vllm:iteration_tokens_total_sum") == 8 + 8 + 4 + 1 + 1
    info = [(dict(ls), v) for (n, ls), v in samples.items() if n == "vllm:cache_config_info"]
    assert info == [({"model_name": "m", "engine": "0", "block_size": "16", "cache_dtype": "float32",
                      "enable_prefix_caching": "True", "gpu_memory_utilization": "0.9", "num_gpu_blocks": "64"}, 1)]


def test_a_prefix_lookup_is_counted_once_when_its_blocks_are_allocated():
    """The head of the queue finds two cached blocks but not the room for the rest: looked up at every step, counted
    only at the step that admits it."""
    from cluster.engine.block_manager import BlockManager
    from cluster.engine.scheduler import Scheduler, SchedulerConfig

    blocks = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks)
    holder = Sequence(0, "a", 0, list(range(10, 22)), SamplingParams())  # 12 tokens: 3 blocks
    blocks.allocate(holder, 12)
    holder.num_computed = 12
    blocks.register_full_blocks(holder)
    head = Sequence(1, "b", 0, list(range(10, 18)) + [1, 2, 3, 4, 5], SamplingParams())  # 13: 2 cached + 2 new
    scheduler.add(head)
    for _ in range(3):
        assert not scheduler.schedule()  # 1 block free, 2 needed
    assert (blocks.prefix_query_tokens, blocks.prefix_hit_tokens) == (0, 0)
    blocks.free_sequence(holder)
    assert [s.seq for s in scheduler.schedule().scheduled] == [head]
    assert (blocks.prefix_query_tokens, blocks.prefix_hit_tokens) == (13, 8)


def test_shards_are_probed_only_while_the_engine_is_idle(tiny_dir, tok):
    from cluster.metrics.sampler import read_engine

    model = load_model(tiny_dir, "fp32", "cpu").model
    config = model.config
    groups = assign_experts(config.num_experts, 2)
    workers = [ShardWorker.load(tiny_dir, config, g, torch.float32, "cpu", "auto") for g in groups]
    model.attach_experts(ExpertParallelExecutor(InProcessTransport(workers), expert_owners(groups)))
    engine = LLMEngine(model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=2**22))
    engine.add_request("r", [5] * 9, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    busy = read_engine(engine, probe=True)
    while engine.has_work():
        engine.step()
    idle, scraped = read_engine(engine, probe=True), read_engine(engine, probe=False)
    assert busy.probes is None and scraped.probes is None
    assert idle.probes is not None and len(idle.probes) == 2 and all(t > 0 for t in idle.probes)
    assert len(idle.rounds) == 3 * config.num_layers  # the steps' rounds, every layer of each: the probe adds none


def test_a_step_larger_than_the_expert_load_is_refused(model):
    load = ExpertLoad(model.config.num_layers, model.config.num_experts, 2, "cpu", rows=4)
    weights = load._weights
    load.step(4).lay_out(torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="a step of 5 tokens, but the expert load was sized for 4 rows"):
        load.step(5)
    assert load._weights is weights  # captured graphs keep reading this storage


# -- expert counts on the device -------------------------------------------------------------------------------------
BLOCK, NUM_BLOCKS = 16, 32
PROMPTS = (5, 33, 16)


def _load_for(model, cache: PagedKVCache, rows: int = 64) -> ExpertLoad:
    return ExpertLoad.for_model(model.config, cache.k.device, rows)


def _prefill(runner: ModelRunner, vocab: int) -> list[ScheduledSeq]:
    """`PROMPTS` prefilled through `runner` (greedy), each then scheduled for one decode token."""
    g = torch.Generator().manual_seed(5)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    seqs = []
    for i, n in enumerate(PROMPTS):
        seq = Sequence(i, f"r{i}", 0, torch.randint(3, vocab, (n,), generator=g).tolist(), SamplingParams())
        seq.block_table = [free.pop() for _ in range(-(-(n + 3) // BLOCK))]
        seqs.append(seq)
    logits, _ = runner.run(SchedulerOutput([ScheduledSeq(s, s.num_tokens) for s in seqs]))
    for s, token in zip(seqs, logits.argmax(-1).tolist()):
        s.num_computed = s.num_tokens
        s.output.append(token)
    return sorted((ScheduledSeq(s, 1) for s in seqs), key=lambda s: s.seq.num_computed)


def test_padding_rows_of_a_decode_bucket_are_not_counted(tiny_dir):
    """The same decode step, padded to a bucket of 8 (static buffers, as CUDA graphs replay it) and unpadded: the
    same count per expert, K per real token of each layer. Two runners share the model: each counts its own steps."""
    model = load_model(tiny_dir, "fp32", "cpu").model
    c = model.config
    deltas = []
    for buckets in ((8,), ()):
        cache = PagedKVCache(c, NUM_BLOCKS, BLOCK, torch.float32, "cpu", backend="torch")
        load = _load_for(model, cache)
        runner = ModelRunner(model, cache, buckets, load)
        items = _prefill(runner, c.vocab_size)
        assert load.counts.sum(dim=1).tolist() == [sum(PROMPTS) * c.experts_per_token] * c.num_layers
        before = load.counts.clone()
        runner.run(SchedulerOutput(items))
        deltas.append(load.counts - before)
    padded, plain = deltas
    assert padded.sum(dim=1).tolist() == [len(PROMPTS) * c.experts_per_token] * c.num_layers
    assert torch.equal(padded, plain)


def test_engine_counts_top_k_per_token_it_computed(make_engine, model):
    """Prompts sharing a prefix (cache hits), n=2 (siblings reuse the prompt's blocks), chunked prefills: each
    layer's count is K x the tokens the engine computed, from the outputs' own usage."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 32000, (40,), generator=g).tolist()
    requests = {"a": (shared + [7, 8, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),
                "b": (shared + [10], SamplingParams(max_tokens=5, temperature=0.9, seed=1, n=2, ignore_eos=True)),
                "c": (torch.randint(3, 32000, (21,), generator=g).tolist(),
                      SamplingParams(max_tokens=4, temperature=0, n=3, ignore_eos=True))}
    engine = make_engine(max_num_batched_tokens=32)
    finals = []
    engine.add_request("a", *requests["a"])
    while engine.has_work():  # "a" first, so "b" finds its prefix cached
        finals += [o for o in engine.step() if o.finished]
    for rid in ("b", "c"):
        engine.add_request(rid, *requests[rid])
    while engine.has_work():
        finals += [o for o in engine.step() if o.finished]
    assert engine.scheduler.num_preemptions == 0 and len(finals) == 6
    assert any(o.cached_prompt_tokens for o in finals)
    computed = sum(o.prompt_tokens - o.cached_prompt_tokens + o.completion_tokens - 1 for o in finals)
    k = model.config.experts_per_token
    assert [sum(row) for row in engine.expert_counts()] == [k * computed] * model.config.num_layers


def test_a_model_run_outside_the_engine_counts_nothing(tiny_dir, tok):
    """After an engine's step, the same model run over a contiguous cache (as the parity tests run it), with as many
    tokens as that step: the engine's counts do not move."""
    from cluster.model.forward_context import current_context
    from cluster.model.kv_cache import ContiguousKVCache

    model = load_model(tiny_dir, "fp32", "cpu").model
    c = model.config
    engine = LLMEngine(model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=2**22))
    prompt = list(range(5, 17))
    engine.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    engine.step()
    before = engine.expert_load.snapshot()
    assert [sum(row) for row in before] == [len(prompt) * c.experts_per_token] * c.num_layers
    cache = ContiguousKVCache(c.num_layers, 1, 32, c.num_kv_heads, c.head_dim)
    with torch.inference_mode():
        model(torch.tensor(prompt), cache.begin_step([0], [len(prompt)]), cache)
    assert engine.expert_load.snapshot() == before
    assert current_context() is None


class _Pausing:
    """The executor it wraps, unchanged, but for one thread's first call: that call waits (at layer 0, inside the
    forward) until `resume` is set."""

    def __init__(self, executor):
        self.executor = executor
        self.graph_safe = executor.graph_safe
        self.thread: threading.Thread | None = None
        self.paused, self.resume = threading.Event(), threading.Event()

    def __call__(self, layer, x, topk_ids, topk_weights):
        if threading.current_thread() is self.thread and not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(60), "never resumed"
        return self.executor(layer, x, topk_ids, topk_weights)


def test_two_engines_stepping_one_model_at_once_count_apart(tiny_dir, tok):
    """Engine A's prefill is held inside its first layer while engine B, sharing the model, runs a whole request on
    another thread; then A finishes. Each counts exactly what it counts alone."""
    model = load_model(tiny_dir, "fp32", "cpu").model
    pausing = _Pausing(model.moe_layers()[0].executor)
    model.attach_experts(pausing)
    prompts = {"a": list(range(5, 17)), "b": list(range(40, 60))}
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

    def engine_for(name: str) -> LLMEngine:
        engine = LLMEngine(model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=2**22))
        engine.add_request(name, prompts[name], params)
        return engine

    def run(engine: LLMEngine) -> None:
        while engine.has_work():
            engine.step()

    alone = {}
    for name in prompts:
        run(engine := engine_for(name))
        alone[name] = engine.expert_load.snapshot()
    a, b = engine_for("a"), engine_for("b")
    failed: list[BaseException] = []

    def step_a() -> None:
        try:
            a.step()
        except BaseException as e:  # seen by the main thread
            failed.append(e)

    pausing.thread = threading.Thread(target=step_a)
    pausing.thread.start()
    try:
        assert pausing.paused.wait(60), "engine A never reached its experts"
        run(b)
    finally:
        pausing.resume.set()
        pausing.thread.join(60)
    assert not failed and not pausing.thread.is_alive()
    run(a)
    assert a.expert_load.snapshot() == alone["a"]
    assert b.expert_load.snapshot() == alone["b"]


def test_shard_rounds_are_timed_and_probed(tiny_dir):
    config = ModelConfig.from_file(tiny_dir)
    groups = assign_experts(config.num_experts, 2)
    workers = [ShardWorker.load(tiny_dir, config, g, torch.float32, "cpu", "auto") for g in groups]
    executor = ExpertParallelExecutor(InProcessTransport(workers), expert_owners(groups), broadcast_rows=4)
    x = torch.randn(6, config.hidden_size)
    ids = torch.tensor([[e % config.num_experts, (e + 3) % config.num_experts] for e in range(6)])
    weights = torch.full((6, 2), 0.5)
    with torch.inference_mode():  # as the engine steps: what the rounds allocate are inference tensors
        untimed = executor(0, x, ids, weights)
        assert len(executor.drain_round_times()) == 1  # drained: the next read starts from here
        assert torch.equal(executor(0, x, ids, weights), untimed)  # split (6 rows > 4)
        executor(1, x[:2], ids[:2], weights[:2])  # broadcast
    times = executor.drain_round_times()
    assert len(times) == 2 and all(t > 0 for t in times)
    # The sampler probes from outside inference mode, between steps.
    probes = executor.probe(torch.zeros(1, config.hidden_size), config.experts_per_token)
    assert len(probes) == 2 and all(t > 0 for t in probes)


def test_a_probe_between_steps_runs_over_the_channel_the_steps_used(tiny_dir):
    """A real shared-memory channel to two shard workers (threads): rounds under inference mode, as the engine steps,
    then the sampler's probe from outside it, which must not write the channel's buffers as a plain tensor."""
    from cluster.parallel import shm_channel

    config = ModelConfig.from_file(tiny_dir)
    groups = assign_experts(config.num_experts, 2)
    spec = ChannelSpec("", 0, 2, config.hidden_size, config.experts_per_token, "fp32", max_rows=8, backend="shm",
                       path=shm_channel.shm_directory(), timeout_s=30, connect_timeout_s=30)
    shm_channel.create_files(spec)
    workers = [ShardWorker.load(tiny_dir, config, g, torch.float32, "cpu", "torch") for g in groups]
    shards = [threading.Thread(target=shm_channel.serve_shard_shm, args=(spec, r + 1, w), daemon=True)
              for r, w in enumerate(workers)]
    for t in shards:
        t.start()
    channel = shm_channel.ShmReplicaChannel(spec)
    try:
        executor = ExpertParallelExecutor(channel, expert_owners(groups))
        # One token, as a decode step of one sequence: the channel's views for one-row frames are made here.
        x = torch.randn(1, config.hidden_size, generator=torch.Generator().manual_seed(0))
        ids, weights = torch.tensor([[0, config.num_experts - 1]]), torch.full((1, 2), 0.5)
        with torch.inference_mode():
            step = executor(0, x, ids, weights)
        probes = executor.probe(torch.zeros(1, config.hidden_size), config.experts_per_token)
        with torch.inference_mode():
            assert torch.equal(executor(0, x, ids, weights), step)  # the channel still works
    finally:
        channel.close()
    for t in shards:
        t.join(10)
    assert len(probes) == 2 and all(t > 0 for t in probes)


def test_gpu_metrics_are_absent_without_nvml():
    from cluster.metrics.gpu import GpuReader

    if _nvml_devices():
        pytest.skip("NVML sees GPUs here (the test below reads them)")
    assert GpuReader().read() == []


def test_gpu_metrics_are_read_from_nvml():
    from cluster.metrics.gpu import GpuReader

    devices = _nvml_devices()
    if not devices:
        pytest.skip("needs NVML and a GPU")
    samples = GpuReader().read()
    assert len(samples) == devices
    for s in samples:
        assert s.memory_total > 0 and 0 <= s.memory_used <= s.memory_total and 0 <= s.utilization <= 1, s


def _nvml_devices() -> int:
    """What NVML itself says, asked independently: 0 where it cannot start."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


@CUDA
@pytest.mark.parametrize("experts", ["local", "two in-process shards"])
def test_cuda_graph_replays_count_what_eager_steps_count(tiny_dir, experts):
    """Whole graphs (experts in this process) and piecewise ones (around an expert-parallel executor): an engine
    replaying captured decode steps counts per expert exactly what an eager engine counts for the same tokens."""
    lm = load_model(tiny_dir, "fp32", "cuda")
    model = lm.model
    if experts != "local":
        config = model.config
        groups = assign_experts(config.num_experts, 2)
        workers = [ShardWorker.load(tiny_dir, config, g, torch.float32, "cuda", "auto") for g in groups]
        model.attach_experts(ExpertParallelExecutor(InProcessTransport(workers), expert_owners(groups)))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in (9, 30, 17, 3, 50)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    counts, tokens = [], []
    for graphs in (True, False):
        engine = LLMEngine(model, lambda ids: "", 2, EngineConfig(kv_cache_bytes=2**26, max_num_seqs=8,
                                                                  cuda_graphs=graphs))
        assert (engine.runner.graphs is not None) == graphs
        assert engine.expert_load.counts.sum().item() == 0  # warm-up and capture left nothing counted
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, greedy)
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        counts.append(engine.expert_load.snapshot())
        tokens.append(out)
    assert tokens[0] == tokens[1]
    assert counts[0] == counts[1]
    k = model.config.experts_per_token
    computed = sum(len(p) + 12 - 1 for p in prompts)
    assert [sum(row) for row in counts[0]] == [k * computed] * model.config.num_layers


# -- live: the single process and the Serve app, before and after traffic --------------------------------------------
CHAT_PREFIX = ("You are a careful assistant. Answer in one short sentence, and say so when you do not know. "
               "The user writes in English or in French.")


def _traffic() -> list[dict]:
    """Sequential requests: streamed and not, n > 1, the same prompt twice (its second time hits the prefix
    cache), a length limit and EOS both possible (the random model may stop on its own)."""
    def chat(text: str, **kw) -> dict:
        return {"messages": [{"role": "system", "content": CHAT_PREFIX}, {"role": "user", "content": text}], **kw}

    return [chat("What is the capital of France?", max_tokens=12, temperature=0),
            chat("What is the capital of France?", max_tokens=10, temperature=0, stream=True,
                 stream_options={"include_usage": True}),
            chat("Quelle heure est-il ?", max_tokens=9, temperature=0.9, seed=3, n=3),
            chat("Name a colour.", max_tokens=7, temperature=0.7, seed=5, n=2, stream=True,
                 stream_options={"include_usage": True})]


async def _send(client, body: dict) -> dict:
    """-> {"n", "usage", "finish_reasons"} of one response (streamed ones read to [DONE])."""
    if not body.get("stream"):
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        return {"n": len(data["choices"]), "usage": data["usage"],
                "finish_reasons": [c["finish_reason"] for c in data["choices"]]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        return _stream_summary([line async for line in r.aiter_lines()])


def _stream_summary(lines: list[str]) -> dict:
    """`_send`'s summary of a streamed response's SSE lines."""
    reasons: dict[int, str] = {}
    usage = None
    for chunk in sse_line_chunks(lines):
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            if c.get("finish_reason"):
                reasons[c["index"]] = c["finish_reason"]
    return {"n": len(reasons), "usage": usage, "finish_reasons": [reasons[i] for i in sorted(reasons)]}


async def _held_stream(app, body: dict, while_held) -> tuple[dict, object]:
    """A streamed request posted straight into the ASGI app (httpx's ASGI transport hands a response over only once
    it has ended): once its first chunk is out (its first token sampled), `await while_held()`; then the request is
    read to its end. -> (its `_send` summary, what `while_held` returned)."""
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    def on_message(message: dict) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
        elif message["type"] == "http.response.body":
            if message.get("body"):
                chunks.put_nowait(message["body"])
            if not message.get("more_body", False):
                chunks.put_nowait(None)

    call = asyncio.create_task(asgi_post(app, "/v1/chat/completions", body, on_message))
    first = await asyncio.wait_for(chunks.get(), timeout=60)
    assert first is not None, "the stream ended before its first chunk"
    held = await while_held()
    text = [first]
    while (chunk := await asyncio.wait_for(chunks.get(), timeout=120)) is not None:
        text.append(chunk)
    await call
    return _stream_summary(b"".join(text).decode().splitlines()), held


def _expected(responses: list[dict], block_size: int) -> dict:
    """What the counters must move by. Tokens computed: choice 0 computes its prompt less what it found cached
    (usage's cached_tokens); each sibling (n > 1) is admitted once choice 0 cached the prompt's full blocks, so it
    computes the rest of the prompt; every choice computes its tokens but the last (sampled, never fed back)."""
    computed = 0
    for r in responses:
        u, n = r["usage"], r["n"]
        prompt, cached = u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]
        sibling_cached = (prompt - 1) // block_size * block_size
        computed += n * prompt - cached - (n - 1) * sibling_cached + u["completion_tokens"] - n
    choices = sum(r["n"] for r in responses)
    reasons = [f for r in responses for f in r["finish_reasons"]]
    return {"prompt": sum(r["usage"]["prompt_tokens"] for r in responses),
            "generation": sum(r["usage"]["completion_tokens"] for r in responses),
            "choices": choices, "requests": len(responses), "computed": computed,
            "cached_first": sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in responses),
            "reasons": {reason: reasons.count(reason) for reason in ("stop", "length")},
            "refused": {status: 0 for status in ("400", "429", "503")}}


def _mismatches(before: dict, after: dict, want: dict, ray: bool, model: str, config: ModelConfig) -> list[str]:
    """Every way the scrape `after` (minus `before`) disagrees with `want`; [] when it all adds up."""
    from cluster.metrics import names as mn

    def delta(spec: mn.MetricSpec, suffix: str = "", **labels: str) -> float:
        name = spec.scraped_base(ray) + suffix
        return _sum(after, name, model_name=model, **labels) - _sum(before, name, model_name=model, **labels)

    checks = {
        "generation tokens": (delta(mn.GENERATION_TOKENS, "_total"), want["generation"]),
        "prompt tokens": (delta(mn.PROMPT_TOKENS, "_total"), want["prompt"]),
        "ttft count": (delta(mn.TTFT, "_count"), want["choices"]),
        "e2e count": (delta(mn.E2E, "_count"), want["choices"]),
        "queue count": (delta(mn.QUEUE, "_count"), want["choices"]),
        "itl count": (delta(mn.ITL, "_count"), want["generation"] - want["choices"]),
        "per-choice generation count": (delta(mn.REQUEST_GENERATION_TOKENS, "_count"), want["choices"]),
        "prompt histogram count": (delta(mn.REQUEST_PROMPT_TOKENS, "_count"), want["requests"]),
        "n histogram count": (delta(mn.REQUEST_PARAMS_N, "_count"), want["requests"]),
        "preemptions": (delta(mn.PREEMPTIONS, "_total"), 0),
        **{f"success {r}": (delta(mn.REQUEST_SUCCESS, "_total", finished_reason=r), want["reasons"][r])
           for r in ("stop", "length")},
        **{f"success {r}": (delta(mn.REQUEST_SUCCESS, "_total", finished_reason=r), 0) for r in ("abort", "error")},
        **{f"refused {status}": (delta(mn.REQUESTS_REFUSED, "_total", status=status), n)
           for status, n in want["refused"].items()},
        "unit ok": (_sum(after, mn.UNIT_STATE.scraped_base(ray), model_name=model, state="ok"), 1),
    }
    # Every computed token was in some step; the cache's configuration is exported once, at 1
    checks["steps observed"] = (delta(mn.ITERATION_TOKENS, "_count") > 0, True)
    checks["cache config info"] = (_sum(after, mn.CACHE_CONFIG_INFO.scraped_base(ray), model_name=model,
                                        enable_prefix_caching="True"), 1)
    if not ray:  # Ray estimates histogram sums from bucket midpoints
        checks["generation histogram sum"] = (delta(mn.REQUEST_GENERATION_TOKENS, "_sum"), want["generation"])
        checks["step tokens"] = (delta(mn.ITERATION_TOKENS, "_sum"), want["computed"])
    experts = mn.EXPERT_TOKENS.scraped_base(ray) + "_total"
    for layer in range(config.num_layers):
        routed = sum(delta(mn.EXPERT_TOKENS, "_total", layer=str(layer), expert=str(e))
                     for e in range(config.num_experts))
        checks[f"layer {layer} routed"] = (routed, config.experts_per_token * want["computed"])
    wrong = [f"{what}: {got} != {expected}" for what, (got, expected) in checks.items() if got != expected]
    series = {name for name, labels in after if dict(labels).get("model_name") == model}
    for spec in (mn.RUNNING, mn.WAITING, mn.KV_CACHE_USAGE):
        if spec.scraped_base(ray) not in series:
            wrong.append(f"{spec.scraped_base(ray)} is missing")
    if experts not in series:
        wrong.append(f"{experts} is missing")
    return wrong


class _HandleBackend:
    """A backend as the Ingress has on Ray (Serve handles to the units): it exports no metrics itself."""

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams, stream: bool = True):
        raise AssertionError("not called")
        yield

    def overloaded(self) -> str | None:
        return None

    async def health(self):
        from cluster.health import Health

        return Health(status="ok")


class _RayEngineBackend(_HandleBackend):
    """An engine's backend whose sink is Ray's: it has `metrics_text`, which has nothing to show."""

    async def metrics_text(self) -> tuple[bytes, str] | None:
        return None


def test_metrics_on_ray_answer_404_saying_where_they_are(tok):
    """On Ray GET /metrics is a route all the same (not Starlette's unknown route): a 404 in OpenAI's error shape
    that names Ray's metrics port and the names the PodMonitor gives the metrics."""
    import httpx

    from cluster.api.server import build_api
    from cluster.engine.sampling_params import SamplingDefaults

    async def get(backend) -> httpx.Response:
        app = build_api(backend, tok, "m", 4096, SamplingDefaults(temperature=1.0))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/metrics")

    for backend in (_HandleBackend(), _RayEngineBackend()):
        response = asyncio.run(get(backend))
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error", error
        for pointer in ("`metrics` port (8080)", "ray_vllm_*", "vllm:*", "PodMonitor"):
            assert pointer in error["message"], error["message"]
        assert "unknown route" not in error["message"]


@pytest.mark.e2e
def test_single_process_metrics_move_by_the_traffic(tiny_dir):
    import httpx

    from cluster.metrics import names as mn
    from cluster.metrics.prometheus_sink import CONTENT_TYPE as PROMETHEUS_TEXT
    from cluster.serve.args import ServeArgs
    from cluster.serve.resolved import resolve
    from cluster.serve.standalone import build_standalone_app

    resolved = resolve(ServeArgs(model=str(tiny_dir), shards=2, dtype="fp32", kv_cache_bytes=2**24))
    app, engine = build_standalone_app(resolved)

    model = resolved.model_name
    # Held open while /metrics is scraped: long enough (EOS ignored) to be still running when the scrape reads the
    # engine, one step after its first token.
    held_body = {"messages": [{"role": "user", "content": "Count slowly."}], "max_tokens": 400, "temperature": 0,
                 "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    too_many = {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2,
                "n": resolved.engine.max_n + 1}  # the engine refuses it (400) before it runs

    async def run() -> tuple[dict, dict, list[dict], dict, str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=120) as client:
            async def scrape() -> dict:
                return _samples((await client.get("/metrics")).text)

            before = await scrape()
            held, during = await _held_stream(app, held_body, scrape)
            responses = [held] + [await _send(client, body) for body in _traffic()]
            refused = await client.post("/v1/chat/completions", json=too_many)
            assert refused.status_code == 400, refused.text
            scraped = await client.get("/metrics")
            assert scraped.headers["content-type"] == PROMETHEUS_TEXT
            return before, during, responses, _samples(scraped.text), scraped.text

    try:
        before, during, responses, after, text = asyncio.run(run())
    finally:
        engine.shutdown()
    want = _expected(responses, resolved.engine.block_size)
    want["refused"]["400"] = 1
    assert want["cached_first"] > 0  # the repeated prompt hit the prefix cache: the count accounts for it
    assert _mismatches(before, after, want, False, model, resolved.config) == []
    assert "vllm:num_requests_running" in text and "# TYPE vllm:generation_tokens_total counter" in text
    gauge = lambda samples, spec: _sum(samples, spec.name, model_name=model)  # noqa: E731
    assert gauge(during, mn.RUNNING) >= 1 and 0 < gauge(during, mn.KV_CACHE_USAGE) <= 1
    # Once every request has ended no sequence holds a block. The prefix cache keeps the blocks' contents, but a
    # cached block nobody holds is on the free list (handed out again when needed), so the usage is 0, not the
    # cache's footprint.
    assert (gauge(after, mn.RUNNING), gauge(after, mn.WAITING), gauge(after, mn.KV_CACHE_USAGE)) == (0, 0, 0)


@pytest.fixture(scope="module")
def metrics_app(local_ray, tiny_dir):
    """The Serve app, as `moe-cluster serve` runs it, under a model name of its own (other apps of the session
    exported their own series), and the URL of the node's metrics agent."""
    from ray import serve

    from cluster.parallel.channel import free_port
    from cluster.serve.app import build_app
    from cluster.serve.args import ServeArgs
    from cluster.serve.local_ray import APP_NAME
    from cluster.serve.resolved import resolve

    args = ServeArgs(model=str(tiny_dir), served_model_name="metrics-check", shards=2, dtype="fp32",
                     kv_cache_bytes=2**24, shard_cpus=0.5, ingress_replicas=1)
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    node = next(n for n in local_ray.nodes() if n["Alive"])
    yield (f"http://127.0.0.1:{port}", f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
           resolve(args))
    serve.delete(APP_NAME)
    serve.shutdown()


def test_ray_metrics_export_moves_by_the_traffic(metrics_app):
    import httpx

    from cluster.metrics import names as mn

    url, metrics_url, resolved = metrics_app
    # Counters are exported from 0: before any traffic the replica's aborted choices are there, at 0 (the replica
    # hands its values to the agent each second).
    aborted = mn.REQUEST_SUCCESS.scraped_base(ray=True) + "_total"
    deadline = time.monotonic() + 60
    while True:
        before = _samples(httpx.get(metrics_url, timeout=30).text)
        zero = [v for (name, labels), v in before.items() if name == aborted
                and {"model_name": "metrics-check", "finished_reason": "abort"}.items() <= dict(labels).items()]
        if zero or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert zero == [0.0]

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return [await _send(client, body) for body in _traffic()]

    responses = asyncio.run(run())
    want = _expected(responses, resolved.engine.block_size)
    assert want["cached_first"] > 0
    deadline = time.monotonic() + 60  # sampled each second, exported each second: a few seconds in practice
    while True:
        after = _samples(httpx.get(metrics_url, timeout=30).text)
        wrong = _mismatches(before, after, want, True, "metrics-check", resolved.config)
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert wrong == []
    # The dashboard and the alerts query this mode through the PodMonitor's relabelling: every metric of this
    # project they query is in the export once relabelled (the GPU ones but where NVML is missing: absent then, by
    # design), and vLLM's carry `engine` (the replica's WorkerId).
    from cluster.metrics.gpu import GpuReader
    from tests.test_monitoring import project_queried, scraped

    relabelled = [scraped(name, dict(labels)) for name, labels in after]
    exported = {labels["__name__"] for labels in relabelled if labels is not None}
    gpu = {n for spec in (mn.GPU_MEMORY_USED, mn.GPU_MEMORY_TOTAL, mn.GPU_UTILIZATION)
           for n in spec.scraped_names(ray=False)}
    absent = set() if GpuReader().available else gpu
    queried = project_queried()
    assert queried and queried - absent <= exported, sorted(queried - absent - exported)
    running = [labels for labels in relabelled if labels and labels["__name__"] == mn.RUNNING.name
               and labels.get("model_name") == "metrics-check"]
    assert running and all(labels["engine"] == labels["WorkerId"] != "" for labels in running), running
    # Ray Serve's metrics the alerts read, under the names and labels they select (the Serve app is moe-cluster).
    serve = {(name, dict(labels).get("status_code")) for name, labels in after
             if dict(labels).get("application") == "moe-cluster"}
    for name, status in (("ray_serve_num_http_requests_total", "200"), ("ray_serve_deployment_replica_healthy", None),
                         ("ray_serve_deployment_status", None)):
        assert (name, status) in serve, (name, sorted(serve))


def test_a_killed_shard_shows_as_a_recovery_of_the_unit(metrics_app):
    import os
    import signal

    import httpx
    from ray import serve

    from cluster.metrics import names as mn
    from cluster.serve.local_ray import APP_NAME

    _, metrics_url, _ = metrics_app
    recoveries = mn.UNIT_RECOVERIES.scraped_base(ray=True) + "_total"
    ok = mn.UNIT_STATE.scraped_base(ray=True)

    def scrape() -> tuple[float, float]:
        samples = _samples(httpx.get(metrics_url, timeout=30).text)
        return (_sum(samples, recoveries, model_name="metrics-check"),
                _sum(samples, ok, model_name="metrics-check", state="ok"))

    before, _ = scrape()
    router = serve.get_deployment_handle("AttentionRouter", APP_NAME)
    os.kill(router.shard_info.remote().result()[1]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while (now := scrape()) != (before + 1, 1) and time.monotonic() < deadline:
        time.sleep(1)
    assert now == (before + 1, 1)


# -- parsing scrapes -------------------------------------------------------------------------------------------------
def _samples(text: str | bytes) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, Ray's own labels kept (a name's series are summed by `_sum`)."""
    from prometheus_client.parser import text_string_to_metric_families

    if isinstance(text, bytes):
        text = text.decode()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            out[key] = out.get(key, 0.0) + s.value
    return out


def _sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def _totals(text: bytes) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (name, _), v in _samples(text).items():
        totals[name] = totals.get(name, 0.0) + v
    return totals


def _by_reason(text: bytes) -> dict[str, float]:
    return {dict(ls)["finished_reason"]: v for (n, ls), v in _samples(text).items()
            if n == "vllm:request_success_total"}
