"""The sink of a Serve replica: `ray.util.metrics`, which each node's metrics agent exports for Prometheus (the
`metrics` port; names as `names` describes: ':' becomes '_', and Ray puts `ray_` before them)."""

from __future__ import annotations

from ray.util import metrics

from cluster.metrics.names import ALL, MetricSpec
from cluster.metrics.sink import Series


class RaySink:
    exposes = False
    content_type = None

    def __init__(self, specs: tuple[MetricSpec, ...] = ALL):
        self._metrics = {spec.name: _make(spec) for spec in specs}

    def series(self, spec: MetricSpec, *labels: str) -> Series:
        return _RaySeries(self._metrics[spec.name], dict(zip(spec.label_names, labels, strict=True)))

    def render(self) -> None:
        return None


class _RaySeries:
    def __init__(self, metric: metrics.Metric, tags: dict[str, str]):
        self.metric = metric
        self.tags = tags

    def inc(self, value: float = 1.0) -> None:
        if value > 0:
            self.metric.inc(value, tags=self.tags)
        elif value == 0:
            # `inc` refuses 0, but a counter exported from 0 lets `increase()` count its first events (a series that
            # first appears at 5 loses those 5) and shows it exists before anything happened. Only Ray's private
            # `_record` sets it: where a Ray lacks it, the series appears at its first event instead.
            record = getattr(self.metric, "_record", None)
            if record is not None:
                record(0.0, tags=self.tags)

    def set(self, value: float) -> None:
        self.metric.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self.tags)


def _make(spec: MetricSpec) -> metrics.Metric:
    if spec.kind == "counter":
        return metrics.Counter(spec.ray_name, spec.help, spec.label_names)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.ray_name, spec.help, spec.label_names)
    return metrics.Histogram(spec.ray_name, spec.help, list(spec.buckets), spec.label_names)
