"""The CPU paged decode-attention kernel against the torch path of the same cache, side by side.

    python benchmarks/cpu_attention.py [--batch 1 16 64] [--rounds 7] [--out FILE]

Shapes are the `mini` checkpoint's (8 layers, 8 query and 2 kv heads of 64), 16-token blocks scattered over the
cache as a long-running server leaves them, contexts seeded uniformly in 32..640 (a c=64 engine run's spread). Two
measurements, each in alternating rounds, median reported:
  attention    `PagedKVCache.attend` for every layer (writing the new rows, then attending), kernel against torch;
  decode step  the model's whole forward plus the lm_head for one decode step of that batch, with either cache.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.checkpoint.default import ensure_default_checkpoint  # noqa: E402
from cluster.attention.metadata import AttentionMetadata  # noqa: E402
from cluster.engine.paged_cache import PagedKVCache  # noqa: E402
from cluster.model.loader import load_model  # noqa: E402
from side_by_side import median_rounds, write_rows  # noqa: E402

BLOCK = 16


def layout(batch: int, num_blocks: int, seed: int) -> AttentionMetadata:
    """One decode token per sequence; every sequence's blocks drawn at random from the whole cache."""
    rng = random.Random(seed)
    contexts = sorted(rng.randint(32, 640) for _ in range(batch))
    free = rng.sample(range(num_blocks), sum(-(-n // BLOCK) for n in contexts))
    tables = [[free.pop() for _ in range(-(-n // BLOCK))] for n in contexts]
    width = max(len(t) for t in tables)
    slots = [t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, contexts)]
    return AttentionMetadata(torch.tensor(slots), torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                             [1] * batch, contexts, batch)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()

    lm = load_model(ensure_default_checkpoint("mini"), "fp32")
    config, model = lm.config, lm.model
    num_blocks = 4096  # 537 MB of fp32 K/V per cache for this shape: far larger than the CPU caches, as in serving
    caches = {"kernel": PagedKVCache(config, num_blocks, BLOCK, torch.float32),
              "torch": PagedKVCache(config, num_blocks, BLOCK, torch.float32, use_kernel=False)}
    assert caches["kernel"].kernel is not None, "the C kernels did not build here"
    g = torch.Generator().manual_seed(0)
    caches["kernel"].k.normal_(generator=g)
    caches["kernel"].v.normal_(generator=g)
    caches["torch"].k.copy_(caches["kernel"].k)
    caches["torch"].v.copy_(caches["kernel"].v)
    print(f"mini shape: {config.num_layers} layers, {config.num_heads} heads, {config.num_kv_heads} kv heads of "
          f"{config.head_dim}; fp32, torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'attn kernel ms':>15} {'attn torch ms':>14} {'torch/kernel':>13} {'KV GB/s':>8} "
          f"{'step kernel ms':>15} {'step torch ms':>14} {'torch/kernel':>13}")
    rows = []
    for batch in args.batch:
        meta = layout(batch, num_blocks, seed=batch)
        q = torch.randn(batch, config.num_heads, config.head_dim, generator=g)
        kv = torch.randn(2, batch, config.num_kv_heads, config.head_dim, generator=g)
        ids = torch.randint(0, config.vocab_size, (batch,), generator=g)
        positions = torch.tensor(meta.context_lens) - 1
        for cache in caches.values():
            cache.begin_step(meta)
        torch.testing.assert_close(caches["kernel"].attend(0, q, kv[0], kv[1]),
                                   caches["torch"].attend(0, q, kv[0], kv[1]), rtol=1e-4, atol=1e-4)

        def attention(cache: PagedKVCache) -> callable:
            return lambda: [cache.attend(layer, q, kv[0], kv[1]) for layer in range(config.num_layers)]

        def step(cache: PagedKVCache) -> callable:
            return lambda: model.compute_logits(model(ids, positions, cache)).argmax(-1)

        attn = median_rounds({name: attention(c) for name, c in caches.items()}, args.rounds)
        steps = median_rounds({name: step(c) for name, c in caches.items()}, args.rounds)
        kv_bytes = 2 * sum(meta.context_lens) * config.num_kv_heads * config.head_dim * 4 * config.num_layers
        row = dict(batch=batch, attention_kernel_ms=attn["kernel"] * 1e3, attention_torch_ms=attn["torch"] * 1e3,
                   attention_speedup=attn["torch"] / attn["kernel"], kernel_kv_gb_s=kv_bytes / attn["kernel"] / 1e9,
                   step_kernel_ms=steps["kernel"] * 1e3, step_torch_ms=steps["torch"] * 1e3,
                   step_speedup=steps["torch"] / steps["kernel"])
        rows.append(row)
        print(f"{batch:>5} {row['attention_kernel_ms']:>15.2f} {row['attention_torch_ms']:>14.2f} "
              f"{row['attention_speedup']:>12.2f}x {row['kernel_kv_gb_s']:>8.1f} {row['step_kernel_ms']:>15.2f} "
              f"{row['step_torch_ms']:>14.2f} {row['step_speedup']:>12.2f}x")
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
