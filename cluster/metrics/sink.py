"""Where recorded values go: one small interface, with a sink for Ray (`ray_sink`) and one for prometheus_client
(`prometheus_sink`), so the recording code (`recorder`, `sampler`) is the same in both modes.

A sink hands out series: a metric of `names` bound to its label values (model_name first, then the metric's own), on
which the recorders call `inc`, `set` or `observe`. Sinks are thread-safe: the event loop records requests while the
sampler thread records gauges.
"""

from __future__ import annotations

from typing import Protocol

from cluster.metrics.names import MetricSpec


class Series(Protocol):
    def inc(self, value: float = 1.0) -> None:
        """Counters: add `value` (>= 0; 0 is a no-op)."""
        ...

    def set(self, value: float) -> None:
        """Gauges."""
        ...

    def observe(self, value: float) -> None:
        """Histograms."""
        ...


class Sink(Protocol):
    exposes: bool  # whether this process serves the text itself (`render`); else another one exports it (Ray's agent)
    content_type: str | None  # of what `render` returns

    def series(self, spec: MetricSpec, *labels: str) -> Series:
        """`spec` bound to its label values, in `spec.label_names` order (model_name first)."""
        ...

    def render(self) -> bytes | None:
        """The Prometheus text exposition of everything recorded; None where the sink does not expose it."""
        ...
