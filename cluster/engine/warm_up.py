"""Every kernel compiled before serving starts: a Triton JIT compile mid-serving stalls the whole batch for seconds.

The experts' backends compile one variant per block config (`warm_up` on the executor, every M bucket up to the
step's token budget); the attention backend compiles its decode kernel for every context-split count it can pick.
Attention, rotary and the dense layers then compile on a few synthetic steps run through the model runner itself: a
prefill step, a mixed step of decodes and a chunk, a decode step. The synthetic sequences write their KV into blocks
no request holds yet (nothing is admitted before the engine is built).
"""

from __future__ import annotations

import logging
import random
import time

import torch

from cluster.engine.model_runner import ModelRunner
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledSeq, SchedulerOutput
from cluster.engine.sequence import Sequence

log = logging.getLogger(__name__)

Shape = tuple[int, int, bool]  # (tokens already computed, new tokens, whether the step samples it)

WARM_UP_STEPS: tuple[tuple[Shape, ...], ...] = (
    ((0, 17, True), (0, 32, True)),
    ((17, 1, True), (32, 1, True), (0, 5, False)),
    ((18, 1, True), (33, 1, True), (5, 1, True)),
)

_GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def synthetic_step(shapes: list[Shape] | tuple[Shape, ...], block_size: int, blocks_per_seq: int, num_blocks: int,
                   vocab: int, rng: random.Random) -> SchedulerOutput:
    """A scheduler output of made-up sequences of the given shapes: random tokens where the step reads them (the
    cached ones are never read: zeros, cheap to make, so a replay times the runner rather than the RNG), sequence j
    owning blocks j * blocks_per_seq onwards (modulo the cache)."""
    scheduled = []
    for j, (computed, new, samples) in enumerate(shapes):
        length = computed + new + (0 if samples else 1)  # a chunk that does not sample leaves tokens behind
        tokens = [0] * computed + [rng.randrange(vocab) for _ in range(length - computed)]
        seq = Sequence(j, f"synthetic-{j}", 0, tokens, _GREEDY)
        seq.num_computed = computed
        seq.block_table = [(j * blocks_per_seq + b) % num_blocks for b in range(-(-(computed + new) // block_size))]
        scheduled.append(ScheduledSeq(seq, new))
    return SchedulerOutput(scheduled)


@torch.inference_mode()
def warm_up(runner: ModelRunner, max_tokens: int, num_blocks: int) -> None:
    """Compile the experts' kernels up to `max_tokens` tokens a step, then run `WARM_UP_STEPS` (before capture)."""
    t0 = time.perf_counter()
    model = runner.model
    executors = {id(moe.executor): moe.executor for moe in model.moe_layers()}  # one warm-up each, shared or not
    for executor in executors.values():
        if hasattr(executor, "warm_up"):  # an optional capability: executors that compile nothing lack it
            executor.warm_up(max_tokens, model.config.experts_per_token)
    cache = runner.cache
    if hasattr(cache.backend, "warm_up"):
        cache.backend.warm_up(cache.k[0], cache.v[0], model.config.num_heads, runner.max_blocks)
    rng = random.Random(0)
    for shapes in WARM_UP_STEPS:
        batch = synthetic_step(shapes, runner.cache.block_size, 4, num_blocks, model.config.vocab_size, rng)
        logits, _ = runner.run(batch)
        logits.argmax(-1).tolist()
    log.info("kernels warmed up in %.1fs", time.perf_counter() - t0)
