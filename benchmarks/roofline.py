"""The roofline meter: each engine step's time against the least the hardware allows for it.

For every step the model runner runs, it records what the step must move and compute, from its shapes and its
routing (the engine's expert counts, kept on the device):
  bytes  the dense weights of every layer, the experts that got at least one token (no more: an expert no token
         chose is never read), the lm_head when a row samples, the KV cache read (every sequence's context) and
         written (the new tokens), the embedding rows;
  FLOPs  2 per active weight per token (`cluster.engine.step_cost`), attention's QK and PV over each token's keys,
         the lm_head over the sampled rows;
and T_roof = max(bytes / read bandwidth, FLOPs / matmul peak), the ceilings measured on the device at hand
(`ceilings.py`). Device time comes from CUDA events around the runner's call (on a CPU, that call's wall time);
wall time is the step's whole period, from its start to the next step's. Per step kind (decode, mixed, prefill) and
size bucket it prints T_roof / device (how close the kernels come to the hardware) and device / wall (how busy the
host keeps the device); over the run, the time the steps took against the sum of their T_roof.

Used by benchmarks/engine.py; `RooflineMeter(engine)` wraps the engine's runner until `close()`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from cluster.config import ModelConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.step_cost import attention_flops_per_key, weight_flops_per_token
from cluster.parallel.placement import expert_weight_bytes

Shape = tuple[int, int, bool]  # (tokens already computed, new tokens, whether the step samples it)


@dataclass(frozen=True)
class StepTraffic:
    bytes: int
    flops: int

    def t_roof(self, read_bytes_per_s: float, flops_per_s: float) -> float:
        return max(self.bytes / read_bytes_per_s, self.flops / flops_per_s)


def dense_weight_count(config: ModelConfig) -> int:
    """Weights one layer reads whatever the routing: attention's projections, the router gate, the two norms."""
    h = config.hidden_size
    attention = h * (config.q_size + 2 * config.kv_size) + config.q_size * h
    router = h * config.num_experts if config.is_moe else 0
    return attention + router + 2 * h


def expert_weight_count(config: ModelConfig) -> int:
    """One expert's weights (w1, w3, w2); the whole MLP of a dense model."""
    return 3 * config.hidden_size * config.intermediate_size


def step_traffic(config: ModelConfig, weight_bytes: int, kv_bytes: int, shapes: list[Shape],
                 touched: list[int], quantization: str | None = None) -> StepTraffic:
    """weight_bytes, kv_bytes: per element; touched[l]: experts of layer l that got a token this step (ignored
    for a dense model, whose MLP every token reads); quantization "fp8": the experts are read in FP8 (a byte a
    weight, and their scales)."""
    h, layers = config.hidden_size, config.num_layers
    tokens = sum(new for _, new, _ in shapes)
    sampled = sum(1 for _, _, samples in shapes if samples)
    weights = layers * dense_weight_count(config) + h  # + the final norm
    if config.is_moe:  # one expert of one layer, as held
        experts = sum(touched) * expert_weight_bytes(config, [0], weight_bytes, quantization) // layers
    else:
        experts = layers * expert_weight_count(config) * weight_bytes
    lm_head = config.vocab_size * h if sampled else 0
    kv_per_token = 2 * layers * config.kv_size  # K and V of every layer
    kv_read = sum(computed + new for computed, new, _ in shapes) * kv_per_token
    moved = ((weights + lm_head + tokens * h) * weight_bytes + experts
             + (kv_read + tokens * kv_per_token) * kv_bytes)
    keys = sum(new * computed + new * (new + 1) // 2 for computed, new, _ in shapes)  # each token's keys, itself too
    flops = (tokens * layers * weight_flops_per_token(config) + keys * layers * attention_flops_per_key(config)
             + 2 * sampled * config.vocab_size * h)
    return StepTraffic(moved, flops)


@dataclass(frozen=True)
class StepRecord:
    kind: str  # decode | mixed | prefill
    bucket: int  # decode: sequences; otherwise tokens; rounded up to a power of two
    tokens: int
    traffic: StepTraffic
    device_s: float
    wall_s: float


def step_kind(shapes: list[Shape]) -> tuple[str, int]:
    decodes = sum(1 for computed, new, _ in shapes if new == 1 and computed > 0)
    tokens = sum(new for _, new, _ in shapes)
    if decodes == len(shapes):
        return "decode", _pow2(decodes)
    return ("mixed" if decodes else "prefill"), _pow2(tokens)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _Pending:
    """One step as recorded, read back (with one sync) when the records are asked for."""

    shapes: list[Shape]
    started: float  # perf_counter at the call
    ended: float  # perf_counter at the return (on a GPU: the launches' end, not the device's)
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None  # around the call, on a GPU
    counts: torch.Tensor | None  # [L, E] routing counts after the step, copied on the device


class RooflineMeter:
    """Records every step the engine's runner runs, until `close()`; `records()` after that."""

    def __init__(self, engine: LLMEngine, quantization: str | None = None):
        """`quantization`: the experts' ("fp8", or None: in the model's dtype)."""
        self.engine = engine
        self.quantization = quantization
        self.config = engine.model.config
        self.weight_bytes = engine.model.lm_head.weight.element_size()
        self.kv_bytes = engine.kv_cache_dtype.itemsize
        self.cuda = engine.device.type == "cuda"
        self._run = engine.runner.run
        self._steps: list[_Pending] = []
        load = engine.expert_load
        self._counts_before = load.counts.clone() if load is not None else None
        self._closed_at: float | None = None
        engine.runner.run = self._timed_run

    def _timed_run(self, batch):  # the runner's `run`, timed
        shapes = [(s.seq.num_computed, s.num_new, s.samples) for s in batch.scheduled]
        events = None
        if self.cuda:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        started = time.perf_counter()
        result = self._run(batch)
        if events is not None:
            events[1].record()
        ended = time.perf_counter()
        load = self.engine.expert_load
        counts = load.counts.clone() if load is not None else None  # on the device: no sync
        self._steps.append(_Pending(shapes, started, ended, events, counts))
        return result

    def close(self) -> None:
        self.engine.runner.run = self._run
        self._closed_at = time.perf_counter()

    def records(self) -> list[StepRecord]:
        if self._closed_at is None:
            raise RuntimeError("close() the meter before reading its records")
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        before = self._counts_before
        for i, step in enumerate(self._steps):
            if step.events is not None:
                device = step.events[0].elapsed_time(step.events[1]) / 1e3
            else:
                device = step.ended - step.started
            following = self._steps[i + 1].started if i + 1 < len(self._steps) else self._closed_at
            touched = [0] * self.config.num_layers
            if step.counts is not None:
                touched = (step.counts > before).sum(dim=1).tolist()
                before = step.counts
            kind, bucket = step_kind(step.shapes)
            traffic = step_traffic(self.config, self.weight_bytes, self.kv_bytes, step.shapes, touched,
                                   self.quantization)
            out.append(StepRecord(kind, bucket, sum(new for _, new, _ in step.shapes), traffic, device,
                                  max(device, following - step.started)))
        return out


def roofline_table(records: list[StepRecord], read_bytes_per_s: float, flops_per_s: float) -> list[dict]:
    """One row per (kind, bucket), then a row over every step: sums of T_roof, device and wall time."""
    groups: dict[tuple[str, int], list[StepRecord]] = defaultdict(list)
    for r in records:
        groups[(r.kind, r.bucket)].append(r)
    rows = [_row(kind, bucket, rs, read_bytes_per_s, flops_per_s) for (kind, bucket), rs in sorted(groups.items())]
    rows.append(_row("all", 0, records, read_bytes_per_s, flops_per_s))
    return rows


def _row(kind: str, bucket: int, records: list[StepRecord], bw: float, peak: float) -> dict:
    roof = sum(r.traffic.t_roof(bw, peak) for r in records)
    device = sum(r.device_s for r in records)
    wall = sum(r.wall_s for r in records)
    return {"kind": kind, "bucket": bucket, "steps": len(records), "t_roof_ms": round(1e3 * roof, 2),
            "device_ms": round(1e3 * device, 2), "wall_ms": round(1e3 * wall, 2),
            "roof_over_device": round(roof / device, 3) if device else None,
            "device_over_wall": round(device / wall, 3) if wall else None}


def print_table(rows: list[dict]) -> None:
    print(f"{'kind':<8}{'bucket':>7}{'steps':>7}{'T_roof ms':>11}{'device ms':>11}{'wall ms':>10}"
          f"{'roof/dev':>10}{'dev/wall':>10}")
    for r in rows:
        print(f"{r['kind']:<8}{r['bucket'] or '':>7}{r['steps']:>7}{r['t_roof_ms']:>11}{r['device_ms']:>11}"
              f"{r['wall_ms']:>10}{r['roof_over_device'] or '-':>10}{r['device_over_wall'] or '-':>10}")
