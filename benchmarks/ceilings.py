"""The two ceilings every GPU number here is read against, measured on the device at hand (datasheets are leads).

  copy_bandwidth  bytes/s of a large device-to-device copy, bytes read + bytes written
  read_bandwidth  bytes/s of a large reduction, which only reads (a decode step mostly reads: weights and KV)
  matmul_peak     FLOP/s of a large bf16 matmul on random data (never zeros: they run faster than real data)

Both take the caller's timer, `bench(fn) -> median ms` (`median_timer` gives the usual one), so a benchmark reads
its kernels and its ceilings with one clock.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

Bench = Callable[..., float]  # (fn, rep ms = default) -> median ms of fn()


def on_gpu_or_interpreter(name: str, dry_run: bool) -> bool:
    """Whether a kernel benchmark runs on the GPU; a dry run goes to Triton's interpreter (set before the kernel
    module defines its kernels), and a real run without a GPU stops, saying so."""
    on_gpu = torch.cuda.is_available() and not dry_run
    if not on_gpu and not dry_run:
        raise SystemExit(f"{name}: needs a CUDA device (or --dry-run)")
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return on_gpu


def median_timer(device: torch.device, rep: int = 200) -> Bench:
    """triton.testing.do_bench's median on a GPU (device events, L2 flushed between calls; it repeats a call about
    `rep` ms worth, so tiny kernels want a short `rep`); on the CPU a wall clock over three calls after a warm-up,
    where the numbers only show that the code runs."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn, rep=rep: triton.testing.do_bench(fn, warmup=min(25, rep), rep=rep, return_mode="median")

    def wall(fn: Callable[[], object], rep: int = rep) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def copy_bandwidth(bench: Bench, device: torch.device, nbytes: int = 2 << 30) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench(lambda: dst.copy_(src)) * 1e-3)


def read_bandwidth(bench: Bench, device: torch.device, nbytes: int = 2 << 30) -> float:
    x = torch.randn(nbytes // 4, device=device)
    return nbytes / (bench(lambda: x.sum()) * 1e-3)


def matmul_peak(bench: Bench, device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / (bench(lambda: a @ b) * 1e-3)


def measure_ceilings(dry_run: bool = False) -> dict:
    """{copy_gbps, bf16_tflops, device}; a dry run measures small sizes on the CPU (meaningless numbers)."""
    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    small = device.type == "cpu"
    bench = median_timer(device)
    copy = copy_bandwidth(bench, device, 64 << 20 if small else 2 << 30)
    peak = matmul_peak(bench, device, 512 if small else 8192)
    return {"device": str(device), "copy_gbps": round(copy / 1e9, 1), "bf16_tflops": round(peak / 1e12, 1),
            "headline": f"copy {copy / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s"}
