"""Helpers the side-by-side benchmarks share: alternating timed rounds, and the rows written as JSON."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable


def median_rounds(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each run once to warm, then `rounds` rounds that take every run in turn (so a noisy moment hits all of them
    alike); the median seconds per run."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_rows(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
