"""The CPU MoE backend: the C kernel `cluster/kernels/cpu/expert_ffn.c` over weights packed once per layer.

A decode step gives each expert ~16 rows. At that size a BLAS matmul spends most of its time repacking the weight
matrix it was handed, while a kernel that reads weights packed ahead of time reaches its register-tile speed
(measured in benchmarks/RESULTS.md, `cpu_experts.py`). Other dtypes and shapes go to the torch backend.

Legend: T = tokens, K = experts per token, P = pairs held here, D = hidden, F = ffn.
"""

from __future__ import annotations

import ctypes

import torch

from cluster.kernels.cpu_build import cpu_kernel_library
from cluster.moe.torch_backend import TorchMoEBackend, group_pairs
from cluster.moe.weights import ExpertWeights

PANEL = 16  # output columns per packed panel (the kernel's NR)


class PackedExperts:
    """One layer's experts in the kernel's layout: w13 [E, 2F/16, D, 16], w2 [E, D/16, F, 16]; `source` is the
    layer as loaded (its expert ids, and what the torch fallback runs)."""

    def __init__(self, weights: ExpertWeights):
        self.source = weights
        self.w13 = _pack(weights.w13)
        self.w2 = _pack(weights.w2)


class CpuMoEBackend:
    """The `MoEBackend` contract; natively fp32 on CPU with D and F multiples of 16, other layers (and activations
    that are not fp32 on CPU) go to the torch backend. Its layout is `PackedExperts`, or the `ExpertWeights` of a
    layer it does not support."""

    name = "cpu"
    graph_safe = False

    def __init__(self, library: ctypes.CDLL | None = None):
        self.library = library or cpu_kernel_library()
        if self.library is None:
            raise RuntimeError("the CPU expert kernels need an x86 CPU with AVX2 and FMA, and a C compiler")
        self.fallback = TorchMoEBackend()
        self._scratch = torch.empty(0)

    def supports(self, weights: ExpertWeights) -> bool:
        _, f2, d = weights.w13.shape
        return (weights.w13.device.type == "cpu" and weights.w13.dtype == weights.w2.dtype == torch.float32
                and d % PANEL == 0 and f2 % (2 * PANEL) == 0)

    def prepare(self, weights: ExpertWeights) -> PackedExperts | ExpertWeights:
        return PackedExperts(weights) if self.supports(weights) else self.fallback.prepare(weights)

    def warm_up(self, prepared: PackedExperts | ExpertWeights, max_tokens: int, top_k: int, num_experts: int) -> None:
        """Nothing to compile: the library was built when the backend was made."""

    def __call__(self, x: torch.Tensor, prepared: PackedExperts | ExpertWeights, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, num_experts: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if not isinstance(prepared, PackedExperts):
            return self.fallback(x, prepared, topk_ids, topk_weights, num_experts, out_dtype)
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return self.fallback(x, prepared.source, topk_ids, topk_weights, num_experts, out_dtype)
        t, k = topk_ids.shape
        n_local, f2, d = prepared.source.w13.shape
        out = torch.zeros(t, d, dtype=torch.float32)
        _, order, counts = group_pairs(prepared.source, topk_ids, num_experts)
        order = order[:int(counts.sum())]  # [P]: pairs held elsewhere sorted last, dropped
        if order.numel() == 0:
            return out.to(out_dtype or x.dtype)
        tokens = order // k
        xs = x.index_select(0, tokens)  # [P, D]
        pair_weight = topk_weights.flatten().float()[order]
        p, f = order.numel(), f2 // 2
        h, act, y = self._workspace([(p, f2), (p, f), (p, d)])
        self.library.expert_ffn(n_local, counts.data_ptr(), d, f, xs.data_ptr(), prepared.w13.data_ptr(),
                                prepared.w2.data_ptr(), tokens.data_ptr(), pair_weight.data_ptr(), h.data_ptr(),
                                act.data_ptr(), y.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out.to(out_dtype or x.dtype)

    def _workspace(self, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Views of one buffer kept across calls: fresh multi-MB buffers every layer cost page faults."""
        sizes = [a * b for a, b in shapes]
        if self._scratch.numel() < sum(sizes):
            self._scratch = torch.empty(sum(sizes), dtype=torch.float32)
        views, start = [], 0
        for (a, b), n in zip(shapes, sizes):
            views.append(self._scratch[start:start + n].view(a, b))
            start += n
        return views


def _pack(w: torch.Tensor) -> torch.Tensor:
    """[E, N, K] -> [E, N/16, K, 16] panels."""
    e, n, k = w.shape
    return w.view(e, n // PANEL, PANEL, k).transpose(2, 3).contiguous()
