"""Helpers the side-by-side benchmarks share: alternating timed rounds, the rows written as JSON, and an earlier
revision's tree to run beside this one."""

from __future__ import annotations

import json
import statistics
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def extract(rev: str, into: Path) -> Path:
    """The tree of git revision `rev` of this repository, written under `into`."""
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"
