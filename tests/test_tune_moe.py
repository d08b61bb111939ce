"""benchmarks/tune_moe.py: its timing steps on fake clocks (interleaved rounds, the margin a pick must beat the
default by), its candidates' shared memory, and its dry run end to end (tiny shapes under the CPU interpreter),
whose table `tuning` finds under the device, dtype and Triton key."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import tune_moe  # noqa: E402

from cluster.kernels import tuning  # noqa: E402


def test_interleaved_rounds_visit_every_candidate_once_in_a_fresh_order() -> None:
    calls: list[str] = []
    ms = tune_moe.interleaved(list("abcd"), lambda c: calls.append(c) or 1.0, 6, random.Random(0))
    assert ms == [1.0] * 4
    rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert len(rounds) == 6 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # shuffled: not one fixed order


def test_interleaving_survives_drift_that_fools_timing_in_blocks() -> None:
    """Clocks ramping up while the sweep runs (each timing 0.01 ms faster than the one before): timed in blocks,
    the slower config b looks faster because it went last; interleaved rounds rank a first."""
    true = {"a": 1.00, "b": 1.04}

    def clock() -> Callable[[str], float]:
        count = iter(range(1000))
        return lambda c: true[c] - 0.01 * next(count)

    tick = clock()
    blocked = {c: sorted(tick(c) for _ in range(5))[2] for c in "ab"}
    assert blocked["b"] < blocked["a"]  # the trap
    ms = tune_moe.interleaved(["a", "b"], clock(), 5, random.Random(0))
    assert ms[0] < ms[1], ms


def test_a_candidate_that_fails_is_dropped_and_not_timed_again() -> None:
    calls: list[str] = []

    def time_one(c: str) -> float:
        calls.append(c)
        if c == "bad":
            raise RuntimeError("out of resources")
        return 2.0

    ms = tune_moe.interleaved(["ok", "bad"], time_one, 4, random.Random(1))
    assert ms == [2.0, float("inf")] and calls.count("bad") == 1 and calls.count("ok") == 4
    assert tune_moe.best(["ok", "bad"], ms, 5) == [(2.0, "ok")]


def test_a_pick_is_written_only_when_it_beats_the_default_by_the_margin() -> None:
    verified = [(0.98, "x"), (0.95, "y")]
    assert tune_moe.choose(1.0, verified, 0.03) == "y"
    assert tune_moe.choose(1.0, verified, 0.06) is None  # 5% faster is not 6%
    assert tune_moe.choose(0.9, verified, 0.0) is None  # slower than the default
    assert tune_moe.choose(1.0, [], 0.0) is None


def test_candidates_fit_the_shared_memory_given() -> None:
    full = tune_moe.kernel_grid(64, False, True, tuning.SMEM_LIMIT)
    assert full and all(tuning.smem_bytes(c) <= tuning.SMEM_LIMIT for c in full)
    small = tune_moe.kernel_grid(64, False, True, 101376)
    assert small and len(small) < len(full) and all(tuning.smem_bytes(c) <= 101376 for c in small)
    assert tune_moe.block_ms(1, 2, 8) == [16] and tune_moe.block_ms(4096, 2, 8) == [16, 32, 64, 128]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU (there: a sweep)")
def test_dry_run_writes_a_table_the_lookup_finds(tmp_path: Path, monkeypatch) -> None:
    report = tmp_path / "report.json"
    assert tune_moe.main(["--dry-run", "--tokens", "4", "--out-dir", str(tmp_path), "--report", str(report),
                          "--margin", "-100"]) == 0  # any verified config beats 101x the default
    rows = json.loads(report.read_text())["rows"]
    assert [r["M"] for r in rows] == [4] and rows[0]["verified"] and rows[0]["torch_ms"] > 0
    assert rows[0]["entry"] != tuning.DEFAULT
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    path = tuning.find_config_file(4, 128, "interpreter", dtype="bf16")
    assert path is not None and f"dtype=bf16,triton={tuning.triton_version()}" in path.name
    table = {int(m): tuning.parse_config(c) for m, c in json.loads(path.read_text()).items()}
    assert table[4] == tuning.parse_config(rows[0]["entry"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU (there: a sweep)")
def test_dry_run_writes_nothing_when_no_pick_beats_the_default(tmp_path: Path) -> None:
    assert tune_moe.main(["--dry-run", "--tokens", "4", "--out-dir", str(tmp_path), "--margin", "2"]) == 0
    assert list(tmp_path.iterdir()) == []
