"""Mixtral 8x7B's shape at full depth on one GPU, random weights made on the device (the GPU check's
`engine_8x7b_full`): as many of its 32 layers as this GPU holds beside the KV cache its workloads need and room for
loading and activations (`HEADROOM_BYTES`). All 32 fit an H200; an 80 GB H100 holds fewer (32 layers are ~93 GB in
bf16), and the result says how many: "layers": "N/32".

First the issue's workload, batch 8, 32 tokens in, 128 out: ms per decode step (each decode step's wall period at
batch 8, with its device time and T_roof); goal <= 20 ms on one H200 at full depth. With fewer layers the step time
is also given scaled linearly to 32 layers, labelled as scaled: an estimate (the embeddings and the lm_head do not
scale with depth), not a measurement. Then per concurrency (1, 8, 64; seeded requests, prompts of 32..512 tokens,
outputs of 16..256): output tokens/s, TTFT and inter-token latency p50/p99, and the roofline meter's table (device
time against T_roof, device/wall). A workload that would start past the section's time is skipped and said so.

A dry run does the same on `tiny` on the CPU (Triton interpreter) with tiny workloads, and a pretend free memory
that holds one of its two layers, so the scaled path runs too.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import time
from dataclasses import dataclass

import torch

from cluster.checkpoint.presets import preset
from cluster.config import ModelConfig
from cluster.dtype import resolve_dtype
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.config import EngineConfig
from cluster.parallel.placement import dense_weight_bytes, expert_weight_bytes
from engine import device_ceilings, make_requests
from gpu_engine import build, device_and_dtype, graph_mode_engine, metered_run, model_source

HEADROOM_BYTES = 6 * 2**30  # loading (a layer's experts stacked beside their tensors), activations, graphs, ceilings
STEP_GOAL_MS = 20.0
BLOCK = EngineConfig.block_size  # the engine's KV block size (the builds here keep the default)

Requests = list[tuple[list[int], int]]  # (prompt, output length)


@dataclass(frozen=True)
class Plan:
    preset: str
    concurrency: tuple[int, ...]
    requests: tuple[int, ...]  # per concurrency
    batch: int  # the step-time workload: `batch` prompts of `prompt` tokens, `output` tokens each
    prompt: int
    output: int
    longest_prompt: int | None = None  # cut the seeded prompts to this (the dry run's)
    longest_output: int | None = None


GPU_PLAN = Plan("mixtral-8x7b", (1, 8, 64), (3, 16, 128), batch=8, prompt=32, output=128)
DRY_PLAN = Plan("tiny", (1, 2, 4), (1, 2, 4), batch=2, prompt=8, output=4, longest_prompt=24, longest_output=3)


def model_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """Every weight of the model, as the planner counts them."""
    return dense_weight_bytes(config, dtype_bytes) + expert_weight_bytes(config, range(config.num_experts), dtype_bytes)


def layers_that_fit(full: ModelConfig, free: int, kv_tokens: int, dtype_bytes: int, headroom: int) -> int:
    """The most layers of `full` whose weights, KV room for `kv_tokens` and `headroom` fit in `free` bytes."""
    def need(layers: int) -> int:
        config = dataclasses.replace(full, num_layers=layers)
        return model_bytes(config, dtype_bytes) + kv_tokens * config.kv_bytes_per_token(dtype_bytes) + headroom

    return max((n for n in range(1, full.num_layers + 1) if need(n) <= free), default=0)


def kv_tokens_needed(workloads: list[tuple[Requests, int]]) -> int:
    """KV slots for the busiest moment of any workload: its `concurrency` longest sequences at once, in whole
    blocks, plus the engine's scratch block."""
    def busiest(requests: Requests, concurrency: int) -> int:
        blocks = sorted((math.ceil((len(p) + o) / BLOCK) for p, o in requests), reverse=True)
        return sum(blocks[:concurrency]) * BLOCK

    return max(busiest(r, c) for r, c in workloads) + BLOCK


def free_device_bytes() -> int:
    gc.collect()  # the earlier sections' engines, then their cached blocks
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def concurrency_workload(plan: Plan, concurrency: int, count: int, vocab: int) -> Requests:
    requests = make_requests(count, vocab, seed=concurrency)
    return [(p[:plan.longest_prompt], min(o, plan.longest_output or o)) for p, o in requests]


def step_workload(plan: Plan, vocab: int) -> Requests:
    rng = random.Random(5)
    return [([rng.randrange(3, vocab) for _ in range(plan.prompt)], plan.output) for _ in range(plan.batch)]


def run(dry_run: bool, deadline: float = math.inf) -> dict:
    plan = DRY_PLAN if dry_run else GPU_PLAN
    full = preset(plan.preset)
    device, dtype = device_and_dtype(dry_run)
    dtype_bytes = resolve_dtype(dtype, device).itemsize
    runs = {c: concurrency_workload(plan, c, n, full.vocab_size) for c, n in zip(plan.concurrency, plan.requests)}
    steps = step_workload(plan, full.vocab_size)
    kv_tokens = kv_tokens_needed([(steps, plan.batch), *((r, c) for c, r in runs.items())])
    one_layer = dataclasses.replace(full, num_layers=1)
    headroom = 0 if dry_run else HEADROOM_BYTES
    free = (model_bytes(one_layer, dtype_bytes) + kv_tokens * one_layer.kv_bytes_per_token(dtype_bytes) if dry_run
            else free_device_bytes())
    layers = layers_that_fit(full, free, kv_tokens, dtype_bytes, headroom)
    if layers == 0:
        raise RuntimeError(f"not one layer of {plan.preset} fits in {free / 1e9:.1f} GB free")
    config = dataclasses.replace(full, num_layers=layers)
    kv_bytes = kv_tokens * config.kv_bytes_per_token(dtype_bytes)
    result: dict = {"model": plan.preset, "device": device, "dtype": dtype, "layers": f"{layers}/{full.num_layers}",
                    "layers_run": layers, "layers_full": full.num_layers, "free_gb": round(free / 1e9, 1),
                    "weights_gb": round(model_bytes(config, dtype_bytes) / 1e9, 1), "kv_gb": round(kv_bytes / 1e9, 2),
                    "headroom_gb": round(headroom / 1e9, 1), "pretend_free_memory": dry_run}
    print(f"   {layers}/{full.num_layers} layers of {plan.preset} fit in {result['free_gb']} GB free "
          f"({result['weights_gb']} GB of weights, {result['kv_gb']} GB of KV cache)", flush=True)
    model_dir, load_format = model_source(f"{plan.preset}-{layers}layers")
    front = graph_mode_engine(result, lambda: build(model_dir, device, dtype, cuda_graphs=device == "cuda",
                                                    max_num_seqs=max(plan.batch, *plan.concurrency),
                                                    attention="triton", load_format=load_format,
                                                    kv_cache_bytes=kv_bytes))
    try:
        ceilings = front.call(lambda e: device_ceilings(e.device, e.model.lm_head.weight.dtype)).result()
        result["step_time"] = step_time(front, plan, steps, ceilings, layers, full.num_layers)
        result["concurrency"] = {str(c): concurrency_run(front, r, c, ceilings, deadline) for c, r in runs.items()}
    finally:
        front.shutdown()
    result["headline"] = headline(result, plan)
    ran = [result["step_time"]["engine"], *(r for r in result["concurrency"].values() if "skipped" not in r)]
    expected = [sum(o for _, o in steps), *(sum(o for _, o in runs[c]) for c in plan.concurrency
                                            if "skipped" not in result["concurrency"][str(c)])]
    result["passed"] = ([r["output_tokens"] for r in ran] == expected
                        and result["step_time"]["decode_steps"] > 0)
    return result


def step_time(front: AsyncEngine, plan: Plan, requests: Requests, ceilings: tuple[float, float], layers: int,
              full_layers: int) -> dict:
    """ms per decode step of the step-time workload: the decode steps that ran the whole batch."""
    served, roofline, _ = metered_run(front, requests, plan.batch, *ceilings)
    rows = [r for r in roofline if r["kind"] == "decode" and r["bucket"] == plan.batch]
    count = sum(r["steps"] for r in rows)

    def per_step(key: str) -> float | None:
        return round(sum(r[key] for r in rows) / count, 3) if count else None

    out = {"batch": plan.batch, "prompt_tokens": plan.prompt, "output_tokens": plan.output, "decode_steps": count,
           "step_ms": per_step("wall_ms"), "device_ms": per_step("device_ms"), "t_roof_ms": per_step("t_roof_ms"),
           "goal_ms": STEP_GOAL_MS, "engine": served.row(), "roofline": roofline}
    full_depth = layers == full_layers
    out["goal_met"] = out["step_ms"] <= STEP_GOAL_MS if full_depth and count else None  # judged at full depth only
    if not full_depth and count:
        out["scaled_step_ms"] = round(out["step_ms"] * full_layers / layers, 3)
        out["scaled_note"] = f"scaled linearly from {layers} to {full_layers} layers: an estimate, not measured"
    return out


def concurrency_run(front: AsyncEngine, requests: Requests, concurrency: int, ceilings: tuple[float, float],
                    deadline: float) -> dict:
    if time.monotonic() > deadline:
        return {"skipped": "out of the section's time"}
    served, roofline, _ = metered_run(front, requests, concurrency, *ceilings)
    total = roofline[-1]
    return {**served.row(), "roof_over_device": total["roof_over_device"],
            "device_over_wall": total["device_over_wall"], "roofline": roofline}


def headline(result: dict, plan: Plan) -> str:
    step = result["step_time"]
    runs = ", ".join(f"c={c} " + (f"{r['tokens_per_s']:.0f} tok/s" if "skipped" not in r else "skipped")
                     for c, r in result["concurrency"].items())
    scaled = f" (scaled to {result['layers_full']} layers: {step['scaled_step_ms']} ms)" if "scaled_step_ms" in step \
        else ""
    return (f"{result['layers']} layers: {runs}; batch {plan.batch}, {plan.prompt} in / {plan.output} out: "
            f"{step['step_ms']} ms/step{scaled}, device {step['device_ms']} ms, T_roof {step['t_roof_ms']} ms")
