"""This machine's `break_even` (`cluster.engine.step_cost`), measured with the model itself before serving starts.

FLOPs price attention against the weights' matmuls as if both ran at one rate; a machine's kernels need not (large
attention matmuls against the experts' small ones, each through its own kernel), and the price decides how small a
long prompt's chunks get beside running streams. Three steps are timed (each the fastest of
`PROBE_REPEATS`): one token, a chunk of `PROBE_TOKENS` at context 0, and the same chunk after `PROBE_CONTEXT` cached
tokens (long, where caches no longer hold the keys and attention costs the most per key). The first two give the
chunk's weight time w without the step's fixed cost, the last two its attention time a over that context:
break_even = context * w / a, held within a factor `MAX_FACTOR` of the FLOPs estimate. The synthetic
chunks write their KV into blocks no request holds yet (nothing is admitted before the engine is built).
"""

from __future__ import annotations

import logging
import random
import time

import torch

from cluster.engine.model_runner import ModelRunner
from cluster.engine.step_cost import StepCost
from cluster.engine.warm_up import synthetic_step

log = logging.getLogger(__name__)

PROBE_TOKENS = 128
PROBE_CONTEXT = 32768
PROBE_REPEATS = 3
MAX_FACTOR = 16.0


@torch.inference_mode()
def measure_step_cost(runner: ModelRunner, num_blocks: int, max_tokens: int) -> StepCost:
    """The model's StepCost with break_even as measured here; the FLOPs estimate where the cache or the context is
    too small to probe. max_tokens: the most tokens a step may carry (the probe's chunk is at most that)."""
    config = runner.model.config
    flops = StepCost.for_model(config)
    bs = runner.cache.block_size
    tokens = min(PROBE_TOKENS, max_tokens)
    context = min(PROBE_CONTEXT, config.max_position_embeddings - tokens, (num_blocks - 1) * bs - tokens)
    if tokens < 16 or context < 16 * tokens:
        return flops
    blocks_per_seq = -(-(context + tokens) // bs)
    rng = random.Random(0)
    shapes = {"one": (0, 1, True), "chunk": (0, tokens, True), "late": (context, tokens, True)}
    times = dict.fromkeys(shapes, float("inf"))
    for _ in range(PROBE_REPEATS):
        for kind, shape in shapes.items():
            batch = synthetic_step([shape], bs, blocks_per_seq, num_blocks, config.vocab_size, rng)
            t0 = time.perf_counter()
            logits, _ = runner.run(batch)
            logits.argmax(-1).tolist()  # waits for the device
            times[kind] = min(times[kind], time.perf_counter() - t0)
    # A step's fixed cost (launches, the experts' dispatch) is in all three: the one-token step takes it out of the
    # chunk's per-token time.
    weights = (times["chunk"] - times["one"]) / (tokens - 1) * tokens  # the chunk's tokens' weight matmuls
    attention = times["late"] - times["chunk"]  # their attention over `context` keys
    measured = context * weights / attention if attention > 0 and weights > 0 else float("inf")
    break_even = min(max(measured, flops.break_even / MAX_FACTOR), flops.break_even * MAX_FACTOR)
    log.info("step cost: a token's attention matches its weights at %.0f cached tokens here (FLOPs say %.0f)",
             break_even, flops.break_even)
    return StepCost(break_even)
