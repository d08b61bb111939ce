"""Stacked expert weights of one layer, as one shard (or the whole model) holds them: in the model's dtype, or in
FP8 with per-output-channel scales (`cluster.kernels.fp8`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from cluster.kernels.fp8 import FP8


@dataclass(frozen=True)
class Fp8Scales:
    """The scales of FP8 expert weights: w13 ~= w13_fp8 * w13[..., None], w2 ~= w2_fp8 * w2[..., None].

    w13: [E, 2F] float32, w2: [E, D] float32 (one per output channel);
    dtype: the model's dtype, which activations arrive in and the torch path dequantizes into.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    dtype: torch.dtype


@dataclass(frozen=True)
class ExpertWeights:
    """The experts `expert_ids` of one layer, stacked for grouped matmuls.

    Legend: E = local experts, F = ffn size, D = hidden size.
    w13: [E, 2F, D]  rows 0..F-1 are w1 (gate), rows F..2F-1 are w3 (up)
    w2:  [E, D, F]   down projection
    scales: None for weights in the model's dtype; for float8_e4m3fn weights, their scales.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    expert_ids: tuple[int, ...]
    scales: Fp8Scales | None = None

    def __post_init__(self) -> None:
        e, f2, d = self.w13.shape
        if self.w2.shape != (e, d, f2 // 2) or len(self.expert_ids) != e:
            raise ValueError(f"inconsistent expert weights: w13 {tuple(self.w13.shape)}, w2 {tuple(self.w2.shape)}, "
                             f"{len(self.expert_ids)} expert ids")
        fp8 = self.w13.dtype == FP8
        if fp8 != (self.scales is not None) or self.w2.dtype != self.w13.dtype:
            raise ValueError(f"w13 {self.w13.dtype} and w2 {self.w2.dtype} with scales "
                             f"{'given' if self.scales is not None else 'absent'}: FP8 weights, and only they, "
                             "need scales")
        if self.scales is not None and (self.scales.w13.shape != (e, f2) or self.scales.w2.shape != (e, d)):
            raise ValueError(f"scales {tuple(self.scales.w13.shape)}, {tuple(self.scales.w2.shape)} do not fit "
                             f"w13 {tuple(self.w13.shape)} and w2 {tuple(self.w2.shape)}: one per output channel")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype these experts compute in: the weights' own, or for FP8 weights the model's."""
        return self.w13.dtype if self.scales is None else self.scales.dtype

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.w13.nbytes + self.scales.w2.nbytes
        return self.w13.nbytes + self.w2.nbytes + scales

    def expert_map(self, num_experts: int) -> torch.Tensor:
        """[num_experts] int32: global expert id -> local index, -1 for experts held elsewhere."""
        return _expert_map(self.expert_ids, num_experts, self.w13.device)

    @classmethod
    def stack(cls, expert_ids: list[int], w1: list[torch.Tensor], w3: list[torch.Tensor],
              w2: list[torch.Tensor]) -> "ExpertWeights":
        """From per-expert HF tensors w1/w3: [F, D] and w2: [D, F]."""
        w13 = torch.stack([torch.cat([a, b], dim=0) for a, b in zip(w1, w3)])
        return cls(w13=w13, w2=torch.stack(w2), expert_ids=tuple(expert_ids))

    @classmethod
    def stack_fp8(cls, expert_ids: list[int], w1: list[tuple[torch.Tensor, torch.Tensor]],
                  w3: list[tuple[torch.Tensor, torch.Tensor]], w2: list[tuple[torch.Tensor, torch.Tensor]],
                  dtype: torch.dtype) -> "ExpertWeights":
        """From per-expert (FP8 values, float32 scales) pairs: w1/w3 ([F, D], [F]) and w2 ([D, F], [D]); `dtype`
        the model's."""
        w13 = torch.stack([torch.cat([a[0], b[0]], dim=0) for a, b in zip(w1, w3)])
        s13 = torch.stack([torch.cat([a[1], b[1]], dim=0) for a, b in zip(w1, w3)])
        scales = Fp8Scales(s13, torch.stack([s for _, s in w2]), dtype)
        return cls(w13=w13, w2=torch.stack([q for q, _ in w2]), expert_ids=tuple(expert_ids), scales=scales)


@lru_cache(maxsize=256)
def _expert_map(expert_ids: tuple[int, ...], num_experts: int, device: torch.device) -> torch.Tensor:
    # Cached: building it on every layer call would copy a host list to the device (a sync) each time.
    m = torch.full((num_experts,), -1, dtype=torch.int32)
    m[list(expert_ids)] = torch.arange(len(expert_ids), dtype=torch.int32)
    return m.to(device)
