"""The metrics of one engine's process: built where the engine runs (the AttentionRouter replica with the Ray sink,
the single process with prometheus_client), handed to its `EngineBackend`."""

from __future__ import annotations

from collections.abc import Callable

from cluster.engine.async_engine import AsyncEngine
from cluster.health import Health
from cluster.metrics.recorder import RequestMetrics
from cluster.metrics.sampler import Sampler
from cluster.metrics.sink import Sink

SAMPLE_PERIOD_S = 1.0  # how often the sampler records the gauges and sampled counters (and probes an idle unit)
_SCRAPE_WAIT_S = 2.0  # a scrape waits this long at most for the engine's facts (else it shows the last ones)


class EngineMetrics:
    """Requests recorded as they pass (`requests`), the rest sampled every period on a thread until the engine
    stops; `render` is the text a GET /metrics serves (None where Ray exports the metrics instead)."""

    def __init__(self, sink: Sink, model_name: str, engine: AsyncEngine,
                 unit_health: Callable[[], Health] | None = None, period_s: float = SAMPLE_PERIOD_S):
        self.sink = sink
        self.requests = RequestMetrics(sink, model_name)
        self.sampler = Sampler(sink, model_name, engine, self.requests, period_s, unit_health)
        self.sampler.start()  # its first sample at once, without holding up the engine's start

    def render(self) -> tuple[bytes, str] | None:
        """A fresh sample (no shard probe), then everything recorded, as Prometheus text with its content type; None
        on Ray. Blocks: call off the loop."""
        if not self.sink.exposes:
            return None
        self.sampler.sample(wait_s=_SCRAPE_WAIT_S)
        return self.sink.render(), self.sink.content_type


def single_process_metrics(model_name: str, engine: AsyncEngine) -> EngineMetrics:
    """`moe-cluster serve --no-ray`: prometheus_client, served at GET /metrics."""
    from cluster.metrics.prometheus_sink import PrometheusSink

    return EngineMetrics(PrometheusSink(), model_name, engine)


def replica_metrics(model_name: str, engine: AsyncEngine, unit_health: Callable[[], Health]) -> EngineMetrics:
    """An AttentionRouter replica: `ray.util.metrics`, exported by its node's metrics agent."""
    from cluster.metrics.ray_sink import RaySink

    return EngineMetrics(RaySink(), model_name, engine, unit_health)
