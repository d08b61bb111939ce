"""The single process's sink: prometheus_client metrics in a registry of the app's own (not the global one, so a
process may build several apps, as tests do), rendered for GET /metrics."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cluster.metrics.names import ALL, MetricSpec
from cluster.metrics.sink import Series

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class PrometheusSink:
    exposes = True

    def __init__(self, specs: tuple[MetricSpec, ...] = ALL):
        # The `_created` series double every counter and histogram for no dashboard's use (vLLM drops them too);
        # the switch is process-wide and only affects what is exposed.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        self._metrics = {spec.name: _make(spec, self.registry) for spec in specs}

    def series(self, spec: MetricSpec, *labels: str) -> Series:
        return self._metrics[spec.name].labels(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _make(spec: MetricSpec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, spec.label_names, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.label_names, registry=registry)
    return Histogram(spec.name, spec.help, spec.label_names, registry=registry, buckets=spec.buckets)
