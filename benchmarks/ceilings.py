"""The two ceilings every GPU number here is read against, measured on the device at hand (datasheets are leads).

  copy_bandwidth  bytes/s of a large device-to-device copy, bytes read + bytes written
  matmul_peak     FLOP/s of a large bf16 matmul on random data (never zeros: they run faster than real data)
"""

from __future__ import annotations

import time

import torch


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    """Median of `repeats` timed calls after one warm-up (device events on CUDA, the host clock on CPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 20) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms * 1e-3)


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = _median_ms(lambda: a @ b, device, repeats)
    return 2 * n**3 / (ms * 1e-3)


def measure_ceilings(dry_run: bool = False) -> dict:
    """{copy_gbps, bf16_tflops, device}; a dry run measures small sizes on the CPU (meaningless numbers)."""
    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    small = device.type == "cpu"
    copy = copy_bandwidth(device, 64 << 20 if small else 2 << 30, 3 if small else 20)
    peak = matmul_peak(device, 512 if small else 8192, 3 if small else 20)
    return {"device": str(device), "copy_gbps": round(copy / 1e9, 1), "bf16_tflops": round(peak / 1e12, 1),
            "headline": f"copy {copy / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s"}
