"""What is sampled rather than recorded as it happens: every period (and at each scrape of the single process) a
thread reads the engine's scheduler and cache (and its configuration), its expert counts, shard round times and the
tokens of each step since the last read, the unit's state and the GPUs, and records gauges, counter increments and
histogram observations.

The engine's facts are read on the engine thread between two steps (`AsyncEngine.call`), through the engine's own
reporting methods (`LLMEngine.stats`, `expert_counts`, `drain_step_tokens`, `drain_shard_rounds`, `probe_shards`)
and nothing else of it: the expert counts live on the device and are copied to the host there, where no step is in
flight. A sample waits for the engine at most its period; one still waiting is not asked again (a stuck engine thread
gets one question, not a queue of them).

The shards' round trip is probed by the periodic sample alone, and only while the engine is idle (no sequence running
or waiting): a probe would delay the next step, and a scrape must not cost the engine anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import LLMEngine
from cluster.engine.stats import EngineStats
from cluster.health import Health
from cluster.metrics import names as mn
from cluster.metrics.gpu import GpuReader
from cluster.metrics.recorder import RequestMetrics
from cluster.metrics.sink import Series, Sink
from cluster.parallel.dispatch import UnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineFacts:
    stats: EngineStats
    expert_counts: list[list[int]] | None  # [L][E] since the engine started; None for a dense model
    rounds: list[float]  # seconds of each layer round to the shards since the last read
    probes: list[float] | None  # each shard's probed round trip; None without shards, unprobed or unreachable
    step_tokens: list[int]  # tokens each engine step computed since the last read
    cache_config: tuple[str, ...]  # the values of mn.CACHE_CONFIG_LABELS


def read_engine(engine: LLMEngine, probe: bool) -> EngineFacts:
    """The facts a sample records; runs on the engine thread between steps. With `probe`, the shards' round trips
    are measured too, if the engine is idle."""
    stats = engine.stats()
    rounds = engine.drain_shard_rounds()
    probes = None
    if probe and not engine.has_work():
        try:
            probes = engine.probe_shards()
        except UnavailableError:  # the unit is recovering; its state says so
            probes = None
        except Exception:  # a probe that fails otherwise must not take the sample's other facts with it
            log.exception("probing the expert shards failed")
            probes = None
    return EngineFacts(stats, engine.expert_counts(), rounds, probes, engine.drain_step_tokens(),
                       cache_config(engine, stats))


def cache_config(engine: LLMEngine, stats: EngineStats) -> tuple[str, ...]:
    """The engine's cache settings as `vllm:cache_config_info` labels them, written as vLLM writes them (str())."""
    c = engine.config
    dtype = str(engine.kv_cache_dtype).removeprefix("torch.")
    return (str(c.block_size), dtype, str(c.enable_prefix_caching), str(c.gpu_memory_utilization),
            str(stats.total_blocks))


class Sampler:
    def __init__(self, sink: Sink, model_name: str, engine: AsyncEngine, requests: RequestMetrics,
                 period_s: float, unit_health: Callable[[], Health] | None = None, gpus: GpuReader | None = None):
        self.sink = sink
        self.model_name = model_name
        self.engine = engine
        self.requests = requests
        self.unit_health = unit_health or Health
        self.gpus = gpus if gpus is not None else GpuReader()
        self.period_s = period_s
        self._lock = threading.Lock()  # one sample at a time: counters advance by differences of totals
        self._totals: dict[tuple, int] = {}
        self._bound: dict[tuple, Series] = {}
        self._pending: Future | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sample(self, wait_s: float | None = None, probe: bool = False) -> None:
        """Record one sample now (waiting at most `wait_s`, default the period, for the engine's facts); `probe`:
        the periodic sample's, which probes the shards of an idle engine."""
        with self._lock:
            self.requests.flush()
            facts = self._engine_facts(self.period_s if wait_s is None else wait_s, probe)
            if facts is not None:
                self._record_engine(facts)
            self._record_unit(self.unit_health())
            self._record_gpus()

    def _run(self) -> None:
        while self.engine.running:
            try:
                self.sample(probe=True)
            except Exception:  # a failed sample must not end the sampling
                log.exception("metrics sample failed")
            if self._stop.wait(self.period_s):
                return

    def _engine_facts(self, wait_s: float, probe: bool) -> EngineFacts | None:
        if self._pending is None:
            self._pending = self.engine.call(partial(read_engine, probe=probe))
        try:
            facts = self._pending.result(timeout=wait_s)
        except FutureTimeout:
            return None  # the engine is in a long step: the same question is read next time
        except Exception:
            log.exception("reading the engine's metrics failed")
            facts = None
        self._pending = None
        return facts

    # -- recording ----------------------------------------------------------------------------------------------
    def _series(self, spec: mn.MetricSpec, *labels: str) -> Series:
        key = (spec.name, *labels)
        if key not in self._bound:
            self._bound[key] = self.sink.series(spec, self.model_name, *labels)
        return self._bound[key]

    def _count(self, spec: mn.MetricSpec, total: int, *labels: str) -> None:
        """Advance a counter to `total` (a running total kept by the thing measured)."""
        key = (spec.name, *labels)
        new = total - self._totals.get(key, 0)
        if new > 0 or key not in self._totals:  # the first sample exports it, from 0
            self._series(spec, *labels).inc(max(new, 0))
            self._totals[key] = total

    def _record_engine(self, facts: EngineFacts) -> None:
        stats = facts.stats
        self._series(mn.RUNNING).set(stats.running)
        self._series(mn.WAITING).set(stats.waiting)
        total = stats.total_blocks
        self._series(mn.KV_CACHE_USAGE).set((total - stats.free_blocks) / total if total else 0.0)
        self._count(mn.PREEMPTIONS, stats.preemptions)
        self._count(mn.PREFIX_CACHE_QUERIES, stats.prefix_query_tokens)
        self._count(mn.PREFIX_CACHE_HITS, stats.prefix_hit_tokens)
        for layer, row in enumerate(facts.expert_counts or ()):
            for expert, tokens in enumerate(row):
                self._count(mn.EXPERT_TOKENS, tokens, str(layer), str(expert))
        if facts.rounds:
            rounds = self._series(mn.EXPERT_ROUND)
            for seconds in facts.rounds:
                rounds.observe(seconds)
        for shard, seconds in enumerate(facts.probes or ()):
            self._series(mn.SHARD_ROUND_TRIP, str(shard)).observe(seconds)
        if facts.step_tokens:
            steps = self._series(mn.ITERATION_TOKENS)
            for tokens in facts.step_tokens:
                steps.observe(tokens)
        self._series(mn.CACHE_CONFIG_INFO, *facts.cache_config).set(1)

    def _record_unit(self, health: Health) -> None:
        for state in mn.UNIT_STATES:
            self._series(mn.UNIT_STATE, state).set(1.0 if health.status == state else 0.0)
        self._count(mn.UNIT_RECOVERIES, int(health.stats.get("recoveries", 0)))

    def _record_gpus(self) -> None:
        for gpu in self.gpus.read():
            labels = (str(gpu.index), gpu.uuid)
            self._series(mn.GPU_MEMORY_USED, *labels).set(gpu.memory_used)
            self._series(mn.GPU_MEMORY_TOTAL, *labels).set(gpu.memory_total)
            self._series(mn.GPU_UTILIZATION, *labels).set(gpu.utilization)
