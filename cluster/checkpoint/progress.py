"""Progress lines for long checkpoint loads."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

ProgressCallback = Callable[[int, int], None]  # (bytes loaded so far, total bytes)

_GB = 1e9


class ProgressPrinter:
    """Prints 'loaded X/Y GB (p%) at R GB/s' at most every `interval` seconds, and once at the end."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, interval: float = 1.0):
        self.label, self.stream, self.interval = label, stream, interval
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9) / _GB
        pct = 100.0 * done / total if total else 100.0
        print(f"{self.label}: {done / _GB:.2f}/{total / _GB:.2f} GB ({pct:.0f}%) at {rate:.2f} GB/s",
              file=self.stream, flush=True)


def default_progress(label: str, total_bytes: int, threshold: int = 256 * 2**20) -> ProgressCallback | None:
    """A printer for loads large enough to be worth watching; None for small ones."""
    return ProgressPrinter(label) if total_bytes >= threshold else None
