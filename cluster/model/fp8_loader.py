"""FP8 weights at load (`cluster.kernels.fp8`): experts read as FP8 from a checkpoint that stores them so, or
quantized as they load from one in bf16/fp32 (or from random weights), one layer at a time so that no more than a
layer is ever held wider; and the non-expert tensors an FP8 checkpoint stores in FP8, dequantized into the model's
dtype (only the experts stay FP8).

The checkpoint layout is the one vLLM reads (config.json: `quantization_config` {"quant_method": "fp8", ...}): a
quantized linear's `X.weight` is float8_e4m3fn, beside `X.weight_scale` in float32, per tensor (shape [] or [1]) or
per output channel ([N] or [N, 1]), and with activation_scheme "static" an `X.input_scale`, which is not read:
activations are scaled per token when they are scaled at all. Whether a tensor is FP8 is read from its header, so
a checkpoint that keeps some linears (the router gates, lm_head) wide loads as it is.

Legend: N = a matrix's output channels.
"""

from __future__ import annotations

import torch

from cluster.checkpoint.names import EXPERT_PROJECTIONS, expert_shape, expert_tensor, weight_scale
from cluster.checkpoint.progress import ProgressCallback, default_progress
from cluster.checkpoint.reader import FP8_STORED, CheckpointError
from cluster.checkpoint.weights import WeightSource
from cluster.config import ModelConfig
from cluster.kernels.fp8 import FP8, dequantize, quantize_rows
from cluster.moe.weights import ExpertWeights

Quantized = tuple[torch.Tensor, torch.Tensor]  # FP8 values [N, K], float32 scales [N]


def load_fp8_experts(reader: WeightSource, config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                     experts: list[int], progress: ProgressCallback | None = None) -> list[ExpertWeights]:
    """The given experts of every layer in FP8, stacked per layer; `dtype` is the model's (what they compute in)."""
    layers = [{expert_tensor(i, e, p): expert_shape(config, p) for e in experts for p in EXPERT_PROJECTIONS}
              for i in range(config.num_layers)]
    names = [name for shapes in layers for name in shapes]
    stored = reader.stored(names)
    from_fp8 = bool(stored) and stored[names[0]].dtype == FP8_STORED
    total = sum(s.nbytes for s in stored.values()) if stored else sum(
        shape[0] * shape[1] for shapes in layers for shape in shapes.values()) * dtype.itemsize
    across = _Across(progress or default_progress("loading experts", total), total)
    out = []
    for i, shapes in enumerate(layers):
        part = across.part()
        q = read_fp8(reader, shapes, device, part) if from_fp8 else _quantize(reader, shapes, dtype, device, part)
        w = {p: [q[expert_tensor(i, e, p)] for e in experts] for p in EXPERT_PROJECTIONS}
        out.append(ExpertWeights.stack_fp8(experts, w["w1"], w["w3"], w["w2"], dtype))
    return out


def load_dense_tensors(reader: WeightSource, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                       device: torch.device | str, progress: ProgressCallback | None = None) -> dict[str, torch.Tensor]:
    """`reader.load(shapes, dtype, ...)` for a checkpoint that may store some of them in FP8: those are read with
    their scales and dequantized into `dtype`."""
    stored = reader.stored(list(shapes))
    fp8 = {name: shape for name, shape in shapes.items() if name in stored and stored[name].dtype == FP8_STORED}
    tensors = reader.load({n: s for n, s in shapes.items() if n not in fp8}, dtype, device, progress,
                          label="loading attention weights")
    for name, (q, scale) in read_fp8(reader, fp8, device).items():
        tensors[name] = dequantize(q, scale, dtype)
    return tensors


def read_fp8(reader: WeightSource, shapes: dict[str, tuple[int, ...]], device: torch.device | str,
             progress: ProgressCallback | None = None) -> dict[str, Quantized]:
    """FP8 matrices [N, K] stored as such, each with its weight_scale as one float32 per output channel."""
    if not shapes:
        return {}
    values = reader.load(shapes, FP8, device, progress, label="loading FP8 weights")
    scale_names = {weight_scale(name): name for name in shapes}
    stored = reader.stored(list(scale_names))
    scales = reader.load({s: stored[s].shape for s in scale_names}, torch.float32, device, _quiet)
    return {name: (values[name], _per_channel(scales[s], shapes[name][0], s)) for s, name in scale_names.items()}


def _quantize(reader: WeightSource, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
              device: torch.device | str, progress: ProgressCallback) -> dict[str, Quantized]:
    tensors = reader.load(shapes, dtype, device, progress, label="loading experts")
    return {name: quantize_rows(tensors.pop(name)) for name in shapes}  # each wide tensor freed as it goes


def _per_channel(scale: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """A per-tensor scale repeated for each output channel, or a per-channel one as [N]."""
    if scale.numel() == 1:
        return scale.reshape(1).expand(rows).contiguous()
    if tuple(scale.shape) in ((rows,), (rows, 1)):
        return scale.reshape(rows).contiguous()
    raise CheckpointError(f"{name} has shape {list(scale.shape)}: expected one scale (per tensor) or {rows} "
                          "(per output channel)")


def _quiet(done: int, total: int) -> None:
    """A progress callback that reports nothing (the scales are small)."""


class _Across:
    """One progress report over a load made in parts (`part()` before each): a part's (done, its own total) is
    reported as the earlier parts' bytes + done, out of `total`."""

    def __init__(self, progress: ProgressCallback | None, total: int):
        self.progress, self.total = progress, total
        self.before = self.latest = 0

    def part(self) -> ProgressCallback:
        self.before += self.latest
        self.latest = 0
        return self._report

    def _report(self, done: int, part_total: int) -> None:
        self.latest = done
        if self.progress:
            self.progress(self.before + done, self.total)
