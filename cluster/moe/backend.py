"""The MoE backend contract, and the registry that picks an implementation for a device.

A backend computes one layer's weighted expert sum for routed tokens. Implementations: `torch_backend` (any dtype
and device; the reference), `cpu_backend` (a C kernel over packed fp32 weights) and `triton_backend` (fused GPU
kernels). They import nothing from here: the contract is structural, and the registry imports them lazily, so a CPU
process never imports Triton.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch

from cluster.moe.weights import ExpertWeights

Layout = TypeVar("Layout")


class MoEBackend(Protocol[Layout]):
    """How a layer's experts run. The holder of the weights (an executor, a shard worker) calls `prepare` once per
    layer at load, keeps what it returns, and hands that to every call: a backend keeps no per-layer state.

    `Layout` is the backend's own form of a layer: the `ExpertWeights` themselves for torch and Triton, packed
    panels for the CPU kernel (which also keep the source weights for its torch fallback).
    """

    name: str
    graph_safe: bool  # a CUDA graph can capture a call: no host sync, sizes read from shapes only

    def supports(self, weights: ExpertWeights) -> bool:
        """Whether this backend runs these weights natively (e.g. the CPU kernel: fp32 on CPU, D and F multiples
        of 16) rather than through a fallback."""
        ...

    def prepare(self, weights: ExpertWeights) -> Layout:
        """This layer in the backend's layout, made once at load (never on a request)."""
        ...

    def __call__(self, x: torch.Tensor, prepared: Layout, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Weighted sum over each token's routed experts that the layer `prepared` holds; others contribute zero.

        Legend: T = tokens, D = hidden, K = experts per token.
        x [T, D]; topk_ids [T, K] global expert ids (int32 or int64); topk_weights [T, K] (fp32 from the router;
        any float dtype is accepted and used in fp32) -> [T, D] in `out_dtype` (default x's).
        Weights multiply and the sum accumulates in fp32: a shard returns fp32 partials so that combining shards
        rounds once.
        """
        ...

    def warm_up(self, prepared: Layout, max_tokens: int, top_k: int, num_experts: int) -> object:
        """Compile every kernel that calls of up to `max_tokens` tokens can launch on this layer, before serving (or
        inside a CUDA-graph capture) rather than during it: Triton's kernels; a no-op for the others."""
        ...


def backend_name(name: str, device: torch.device | str) -> str:
    """`auto` -> Triton on CUDA, the C kernel on x86 CPUs that can build it, and torch elsewhere; others as given."""
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "triton"
    from cluster.kernels.cpu_build import cpu_kernel_library

    return "cpu" if cpu_kernel_library() is not None else "torch"


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> MoEBackend:
    """The backend `name` (see `backend_name` for `auto`)."""
    name = backend_name(name, device)
    if name == "torch":
        from cluster.moe.torch_backend import TorchMoEBackend

        return TorchMoEBackend()
    if name == "cpu":
        from cluster.moe.cpu_backend import CpuMoEBackend

        return CpuMoEBackend()
    if name == "triton":
        from cluster.moe.triton_backend import TritonMoEBackend

        return TritonMoEBackend()
    raise ValueError(f"unknown MoE backend {name!r} (choose auto, cpu, torch or triton)")
