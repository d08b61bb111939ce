"""Progress lines for long checkpoint loads, logged."""

from __future__ import annotations

import logging
import time
from typing import Callable

ProgressCallback = Callable[[int, int], None]  # (bytes loaded so far, total bytes)

_GB = 1e9

log = logging.getLogger(__name__)


class ProgressPrinter:
    """Logs 'LABEL: X/Y GB (p%) at R GB/s' at most every `interval` seconds, and once at the end."""

    def __init__(self, label: str, interval: float = 1.0):
        self.label, self.interval = label, interval
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9) / _GB
        pct = 100.0 * done / total if total else 100.0
        log.info("%s: %.2f/%.2f GB (%.0f%%) at %.2f GB/s", self.label, done / _GB, total / _GB, pct, rate)


def default_progress(label: str, total_bytes: int, threshold: int = 256 * 2**20) -> ProgressCallback | None:
    """A printer for loads large enough to be worth watching; None for small ones."""
    return ProgressPrinter(label) if total_bytes >= threshold else None
