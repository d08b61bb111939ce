"""Triton paged decode attention against the HBM bound, at Mixtral 8x22B's attention shape.

    python benchmarks/paged_attention.py [--dry-run] [--out FILE]

Batch 64, 4096 tokens of context each, 48 query / 8 kv heads of 128, bf16, 16-token blocks scattered over the cache
as a long-running server leaves them. The kernel is timed with triton.testing.do_bench (median) at the split count
the backend would choose and at a few others; the bound is the bytes of K/V read once over the device-to-device
copy bandwidth measured in the same run (read + write counted). Before timing, a sample of rows is checked against
attention computed in float64 from the same cache rows.

--dry-run runs tiny shapes on the CPU under the Triton interpreter in seconds, only to prove the script works: it
reports no bandwidth (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ceilings import copy_bandwidth, median_timer, on_gpu_or_interpreter  # noqa: E402

# (batch, context, query heads, kv heads, head dim, block size)
FULL = (64, 4096, 48, 8, 128, 16)
DRY = (4, 80, 8, 2, 64, 16)
CHECK_ROWS = 4
CHECK_TOL = 2e-2  # bf16, relative to the float64 reference


def build(shape: tuple[int, ...], device: torch.device, seed: int = 0):
    """Scattered caches and tables for `shape`: (q [B, H, Dh], k, v [KV, N, bs, Dh], tables [B, NB], lens [B])."""
    batch, context, heads, kv_heads, head_dim, bs = shape
    per_seq = -(-context // bs)
    num_blocks = batch * per_seq + 8
    g = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(kv_heads, num_blocks, bs, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    v = torch.randn(kv_heads, num_blocks, bs, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    order = torch.randperm(num_blocks, generator=g, device=device)[:batch * per_seq]
    tables = order.view(batch, per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    return q, k, v, tables, lens


def check(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor,
          context: int, scale: float) -> float:
    """Relative error of the first CHECK_ROWS rows against float64 attention over the same cache rows."""
    kv_heads, _, bs, head_dim = k.shape
    group = q.shape[1] // kv_heads
    rows = min(CHECK_ROWS, q.shape[0])
    pos = torch.arange(context, device=q.device)
    slots = (tables[:rows, pos // bs].long() * bs + pos % bs)  # [rows, ctx]
    keys = k.reshape(kv_heads, -1, head_dim)[:, slots].double()  # [KV, rows, ctx, Dh]
    values = v.reshape(kv_heads, -1, head_dim)[:, slots].double()
    qg = q[:rows].double().view(rows, kv_heads, group, head_dim).transpose(0, 1)  # [KV, rows, G, Dh]
    probs = (qg @ keys.transpose(2, 3) * scale).softmax(-1)
    want = (probs @ values).transpose(0, 1).reshape(rows, -1, head_dim)
    return ((out[:rows].double() - want).norm() / want.norm()).item()


def run(dry_run: bool) -> dict:
    """Time the decode kernel; return {ms, bytes, gbps, hbm_gbps, fraction_of_hbm, ...} (dry run: no bandwidths)."""
    on_gpu = on_gpu_or_interpreter("paged_attention", dry_run)
    from cluster.kernels.paged_attention import decode_splits, paged_decode

    device = torch.device("cuda" if on_gpu else "cpu")
    shape = FULL if on_gpu else DRY
    batch, context, heads, kv_heads, head_dim, bs = shape
    q, k, v, tables, lens = build(shape, device)
    scale = head_dim ** -0.5
    out = torch.empty_like(q)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
    chosen = decode_splits(batch, kv_heads, tables.shape[1], bs, sms)

    def decode(splits: int):
        return lambda: paged_decode(q, k, v, tables, lens, scale, out, num_splits=splits)

    decode(chosen)()
    err = check(out, q, k, v, tables, context, scale)
    if not err < CHECK_TOL:
        raise RuntimeError(f"paged decode output is off: relative error {err:.3e} >= {CHECK_TOL}")
    kv_bytes = 2 * batch * context * kv_heads * head_dim * k.element_size()
    result = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu (Triton interpreter)",
              "shape": dict(zip(("batch", "context", "heads", "kv_heads", "head_dim", "block_size"), shape)),
              "splits": chosen, "rel_err": err, "bytes": kv_bytes}
    if not on_gpu:
        t0 = time.perf_counter()
        decode(chosen)()
        result.update(ms=(time.perf_counter() - t0) * 1e3, gbps=None, hbm_gbps=None, fraction_of_hbm=None,
                      note="dry run: the interpreter's time, no bandwidth claimed",
                      headline=f"dry run ran (rel err {err:.1e}); no GPU numbers")
        return result

    bench = median_timer(device)
    hbm = copy_bandwidth(bench, device)
    per_split = {s: bench(decode(s)) for s in sorted({1, 2, 4, 8, chosen})}
    ms = per_split[chosen]
    gbps = kv_bytes / (ms * 1e-3) / 1e9
    result.update(ms=ms, gbps=gbps, hbm_gbps=hbm / 1e9, fraction_of_hbm=gbps / (hbm / 1e9),
                  ms_by_splits={str(s): t for s, t in per_split.items()})
    result["headline"] = (f"decode {batch}x{context}: {ms:.3f} ms, {gbps:.0f} GB/s = "
                          f"{result['fraction_of_hbm']:.2f} of copy bandwidth ({chosen} splits)")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = run(args.dry_run)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
