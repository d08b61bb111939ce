"""The single process's sink: prometheus_client metrics in a registry of the app's own (not the global one, so a
process may build several apps, as tests do), rendered for GET /metrics. vLLM's metrics get the `engine` label of
the process's one engine (`names.SINGLE_PROCESS_ENGINE`) after model_name, as vLLM exports them."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from cluster.metrics.names import ALL, SINGLE_PROCESS_ENGINE, MetricSpec
from cluster.metrics.sink import Series

# What `generate_latest` writes: the text format 0.0.4 (prometheus_client's own handler serves it so when the
# scraper negotiates nothing else).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PrometheusSink:
    exposes = True
    content_type = CONTENT_TYPE

    def __init__(self, specs: tuple[MetricSpec, ...] = ALL, engine: str = SINGLE_PROCESS_ENGINE):
        self._metrics = {spec.name: _make(spec) for spec in specs}
        self.engine = engine
        self.registry = CollectorRegistry()
        self.registry.register(_WithoutCreated(list(self._metrics.values())))

    def series(self, spec: MetricSpec, *labels: str) -> Series:
        if spec.per_engine:  # model_name, then the engine, then the metric's own
            labels = (labels[0], self.engine, *labels[1:])
        return self._metrics[spec.name].labels(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WithoutCreated:
    """The metrics without their `_created` samples, which double every counter and histogram for no dashboard's use
    (vLLM drops them too). prometheus_client's own switch for that is process-wide; this keeps it to the registry."""

    def __init__(self, metrics: list[Counter | Gauge | Histogram]):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            for family in metric.collect():  # fresh families at each collection
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family


def _make(spec: MetricSpec) -> Counter | Gauge | Histogram:
    """A metric in no registry (`_WithoutCreated` collects it)."""
    labels = spec.exposed_label_names
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, labels, registry=None)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, labels, registry=None)
    return Histogram(spec.name, spec.help, labels, registry=None, buckets=spec.buckets)
