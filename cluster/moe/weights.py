"""Stacked expert weights of one layer, as one shard (or the whole model) holds them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class ExpertWeights:
    """The experts `expert_ids` of one layer, stacked for grouped matmuls.

    Legend: E = local experts, F = ffn size, D = hidden size.
    w13: [E, 2F, D]  rows 0..F-1 are w1 (gate), rows F..2F-1 are w3 (up)
    w2:  [E, D, F]   down projection
    """

    w13: torch.Tensor
    w2: torch.Tensor
    expert_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        e, f2, d = self.w13.shape
        if self.w2.shape != (e, d, f2 // 2) or len(self.expert_ids) != e:
            raise ValueError(f"inconsistent expert weights: w13 {tuple(self.w13.shape)}, w2 {tuple(self.w2.shape)}, "
                             f"{len(self.expert_ids)} expert ids")

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def expert_map(self, num_experts: int) -> torch.Tensor:
        """[num_experts] int32: global expert id -> local index, -1 for experts held elsewhere."""
        return _expert_map(self.expert_ids, num_experts, self.w13.device)

    @classmethod
    def stack(cls, expert_ids: list[int], w1: list[torch.Tensor], w3: list[torch.Tensor],
              w2: list[torch.Tensor]) -> "ExpertWeights":
        """From per-expert HF tensors w1/w3: [F, D] and w2: [D, F]."""
        w13 = torch.stack([torch.cat([a, b], dim=0) for a, b in zip(w1, w3)])
        return cls(w13=w13, w2=torch.stack(w2), expert_ids=tuple(expert_ids))


@lru_cache(maxsize=256)
def _expert_map(expert_ids: tuple[int, ...], num_experts: int, device: torch.device) -> torch.Tensor:
    # Cached: building it on every layer call would copy a host list to the device (a sync) each time.
    m = torch.full((num_experts,), -1, dtype=torch.int32)
    m[list(expert_ids)] = torch.arange(len(expert_ids), dtype=torch.int32)
    return m.to(device)
