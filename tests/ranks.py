"""Processes of one torch.distributed group for a test: started with spawn, joined within a deadline, killed if
they outlive it (a hung collective fails the test instead of hanging the suite)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def run_ranks(main: Callable[..., None], args: tuple, ranks: int, timeout_s: float) -> None:
    """`main(rank, *args)` in `ranks` processes; raises what a rank raised, fails the test past `timeout_s`."""
    context = mp.start_processes(main, args=args, nprocs=ranks, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"ranks still running after {timeout_s} s", pytrace=False)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
