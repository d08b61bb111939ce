"""The fused decode glue kernels (`cluster.kernels.glue`) against the torch ops they replace, at decode sizes.

    python benchmarks/glue_kernels.py [--dry-run] [--out FILE]

Mixtral 8x7B's shape (D 4096, 32 query / 8 kv heads of 128, 8 experts, top-2), bf16, T in 1, 8, 64, 256. Per op:
  add_rms_norm  r = x + residual, y = RMSNorm(r)     torch: the add, then RMSNorm's torch code
  rms_norm      y = RMSNorm(x)                       torch: RMSNorm's torch code
  rotary        q, k rotated by their positions      torch: RotaryEmbedding's torch code
  route         top-2, softmax, the expert count     torch: `route`, then `ExpertStep.add`
columns:
  fused_us, torch_us  medians of `ceilings.median_timer` (triton.testing.do_bench: device events, L2 flushed)
  bytes               what the op must read and write once (the weight and the count rows included)
  fraction            bytes / fused time, over the device-to-device copy bandwidth measured in the same run
                      (`ceilings.copy_bandwidth`, read + write counted)
  ratio               fused / torch
The torch side runs the layers' own torch code (the glue selector held off the fused kernels), so it is what the
model ran before. Before timing, each fused output is checked against the torch one (router logits without ties).

--dry-run runs tiny shapes on the CPU under the Triton interpreter, only to prove the script works: it reports no
bandwidth (its times are the interpreter's and mean nothing). A GPU check can import it (repository root on sys.path)
and call `run(dry_run) -> dict`, each mode in a process of its own (Triton fixes interpreter or compiler when the
kernels are defined).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ceilings import copy_bandwidth, median_timer, on_gpu_or_interpreter  # noqa: E402

CHECK_TOL = 2e-2  # ||fused - torch|| / ||torch||, bf16


@dataclass(frozen=True)
class Plan:
    """What one run measures, and where."""

    device: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    tokens: tuple[int, ...]


GPU = Plan("cuda", 4096, 32, 8, 128, 8, 2, (1, 8, 64, 256))
DRY = Plan("cpu", 64, 4, 2, 16, 8, 2, (1, 8))


@dataclass(frozen=True)
class Case:
    """One op at one T: both sides as thunks, the bytes the op moves, and a check of the fused side's output."""

    op: str
    tokens: int
    fused: Callable[[], object]
    torch_ops: Callable[[], object]
    bytes: int
    check: Callable[[], float]  # relative error of the fused output against the torch one


@contextlib.contextmanager
def torch_glue() -> Iterator[None]:
    """The layers run their torch code on any device while inside."""
    from cluster.model import glue_selector

    fused = glue_selector.fused_glue
    glue_selector.fused_glue = lambda t: None
    try:
        yield
    finally:
        glue_selector.fused_glue = fused


def _on_torch(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch_glue():
            return fn()

    return run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cases(plan: Plan, t: int, g: torch.Generator) -> list[Case]:
    """The four ops at T = t on fresh random bf16 inputs."""
    from cluster.kernels import glue
    from cluster.model.layers import RMSNorm, RotaryEmbedding
    from cluster.model.router import route
    from cluster.moe.load import ExpertStep

    dev, dt, d = plan.device, torch.bfloat16, plan.hidden
    h, kv, dh, e, k = plan.heads, plan.kv_heads, plan.head_dim, plan.experts, plan.top_k

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=dev).to(dt)

    norm = RMSNorm(d, 1e-5).to(dev, dt)
    norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g, device=dev))
    x, res = randn(t, d), randn(t, d)
    rotary = RotaryEmbedding(dh, 1e6)
    rotary.inv_freq = rotary.inv_freq.to(dev)
    q, kk = randn(t, h, dh), randn(t, kv, dh)
    positions = torch.randint(0, 32768, (t,), generator=g, device=dev, dtype=torch.int32)
    logits = (torch.argsort(torch.rand(t, e, generator=g, device=dev), dim=-1).float() / 4).to(dt)  # no ties
    counts = torch.zeros(2, e, dtype=torch.int64, device=dev)  # [L, E]: two layers' rows, the op adds to row 1
    count_w = torch.ones(t, k, dtype=torch.int64, device=dev)
    step = ExpertStep(counts, count_w)

    def torch_add_norm() -> tuple[torch.Tensor, torch.Tensor]:
        r = res + x
        return norm(r), r

    def torch_route() -> tuple[torch.Tensor, torch.Tensor]:
        w, ids = route(logits, k)
        step.add(1, ids)
        return w, ids

    def check_norm(residual: torch.Tensor | None) -> float:
        want = _on_torch(torch_add_norm if residual is not None else lambda: (norm(x), x))()
        got = glue.add_rms_norm(x, norm.weight, norm.eps, residual)
        return max(_rel(a, b) for a, b in zip(got, want))

    def check_rotary() -> float:
        want = _on_torch(lambda: rotary(positions, q.clone(), kk.clone()))()
        got = glue.rotary(positions, q.clone(), kk.clone(), rotary.inv_freq)
        return max(_rel(a, b) for a, b in zip(got, want))

    def check_route() -> float:
        before = counts.clone()
        w, ids = torch_route()
        torch_counts = counts - before
        fw, fids = glue.route(logits, k, counts[1], count_w)
        same = torch.equal(fids, ids) and torch.equal(counts - before - torch_counts, torch_counts)
        return _rel(fw, w) if same else float("inf")

    act, weight = d * dt.itemsize, d * norm.weight.element_size()
    qk = (h + kv) * dh * dt.itemsize
    return [
        Case("add_rms_norm", t, lambda: glue.add_rms_norm(x, norm.weight, norm.eps, res), _on_torch(torch_add_norm),
             4 * t * act + weight, lambda: check_norm(res)),
        Case("rms_norm", t, lambda: glue.add_rms_norm(x, norm.weight, norm.eps), _on_torch(lambda: norm(x)),
             2 * t * act + weight, lambda: check_norm(None)),
        Case("rotary", t, lambda: glue.rotary(positions, q, kk, rotary.inv_freq),
             _on_torch(lambda: rotary(positions, q, kk)), 2 * t * qk + 4 * t + 4 * dh // 2, check_rotary),
        Case("route", t, lambda: glue.route(logits, k, counts[1], count_w), _on_torch(torch_route),
             t * e * dt.itemsize + t * k * (4 + 8 + 8) + 2 * e * 8, check_route),
    ]


@torch.inference_mode()  # as the model runs: no autograd bookkeeping on the torch side
def run(dry_run: bool) -> dict:
    """Check and time every op at every T; -> {rows: [...], copy_gbps, headline, ...} (dry run: no bandwidth)."""
    on_gpu = on_gpu_or_interpreter("glue_kernels", dry_run)
    plan = GPU if on_gpu else DRY
    device = torch.device(plan.device)
    g = torch.Generator(device=device).manual_seed(0)
    bench = median_timer(device, rep=50)
    copy = copy_bandwidth(bench, device) if on_gpu else None
    rows = []
    for t in plan.tokens:
        for case in cases(plan, t, g):
            err = case.check()
            if not err < CHECK_TOL:
                raise RuntimeError(f"{case.op} at T={t}: fused output off the torch one (relative error {err:.3e})")
            fused_ms, torch_ms = bench(case.fused), bench(case.torch_ops)
            fraction = case.bytes / (fused_ms * 1e-3) / copy if copy else None
            rows.append({"op": case.op, "tokens": t, "fused_us": fused_ms * 1e3, "torch_us": torch_ms * 1e3,
                         "bytes": case.bytes, "fraction": fraction, "ratio": fused_ms / torch_ms, "rel_err": err})
    result = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu (Triton interpreter)",
              "shape": {k: v for k, v in vars(plan).items() if k not in ("device", "tokens")},
              "copy_gbps": copy / 1e9 if copy else None, "rows": rows}
    worst = max(rows, key=lambda r: r["ratio"])
    result["headline"] = (f"fused/torch {min(r['ratio'] for r in rows):.2f}..{worst['ratio']:.2f} "
                          f"(worst {worst['op']} at T={worst['tokens']})"
                          + ("" if on_gpu else "; dry run: interpreter times, no bandwidth claimed"))
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']}; copy bandwidth "
          f"{'-' if result['copy_gbps'] is None else format(result['copy_gbps'], '.0f')} GB/s")
    print(f"{'op':<13} {'T':>4} {'fused us':>10} {'torch us':>10} {'bytes':>10} {'of copy bw':>10} {'fused/torch':>11}")
    for r in result["rows"]:
        fraction = "-" if r["fraction"] is None else f"{r['fraction']:.3f}"
        print(f"{r['op']:<13} {r['tokens']:>4} {r['fused_us']:>10.1f} {r['torch_us']:>10.1f} {r['bytes']:>10} "
              f"{fraction:>10} {r['ratio']:>11.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = run(args.dry_run)
    print_table(result)
    print(result["headline"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
