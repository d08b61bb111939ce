"""Triton MoE backend: align the pairs, pick a block config, run the fused gate_up and down kernels.

FP8 weights run W8A8 (activations quantized per token, FP8 dots) on GPUs that multiply FP8 (compute capability 8.9
and later: Ada, Hopper, Blackwell), else W8A16 (the FP8 tiles widened to the activations' dtype), see
`cluster.kernels.fused_moe`; the interpreter runs W8A16 unless told otherwise (`fp8_activations`).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from cluster.kernels.align import align_pairs
from cluster.kernels.fp8 import FP8
from cluster.kernels.fused_moe import fused_experts
from cluster.kernels.tuning import MoEConfig, config_buckets, get_config, interpreting
from cluster.moe.weights import ExpertWeights

FP8_DOT_CAPABILITY = (8, 9)  # the first GPUs with FP8 tensor-core instructions (sm_89)


class TritonMoEBackend:
    """Fused grouped-GEMM MoE (see `cluster.kernels.fused_moe`) under the `MoEBackend` contract; its layout is the
    `ExpertWeights` themselves. Router weights are used in fp32 whatever the activations' dtype."""

    name = "triton"
    graph_safe = True  # no host sync, sizes from shapes only: a decode step through it can be captured

    def __init__(self, fp8_activations: bool | None = None):
        """`fp8_activations`: how FP8 weights run, W8A8 (True) or W8A16 (False); None: W8A8 where the device
        multiplies FP8 (`fp8_dot_supported`)."""
        self.fp8_activations = fp8_activations

    def supports(self, weights: ExpertWeights) -> bool:
        """Float or FP8 weights on a GPU (or anywhere under the Triton interpreter); the kernels mask any D and F."""
        return ((weights.w13.device.type == "cuda" or interpreting())
                and weights.w13.dtype in (torch.float32, torch.bfloat16, torch.float16, FP8))

    def prepare(self, weights: ExpertWeights) -> ExpertWeights:
        return weights

    def config(self, tokens: int, weights: ExpertWeights) -> MoEConfig:
        return get_config(tokens, weights.w13.shape[0], weights.w2.shape[2], weights.w13.device, weights.dtype,
                          weights.scales is not None)

    def __call__(self, x: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, num_experts: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        t, d = x.shape
        num_local = weights.w13.shape[0]
        if t == 0 or num_local == 0:
            return torch.zeros(t, d, dtype=out_dtype or x.dtype, device=x.device)
        cfg = self.config(t, weights)
        aligned = align_pairs(topk_ids, weights.expert_map(num_experts), num_local, cfg.block_m)
        xw = x.to(weights.dtype)  # tl.dot needs both operands in one dtype (FP8 weights: widened to it)
        scales = weights.scales
        if scales is None:
            out = fused_experts(xw, weights.w13, weights.w2, topk_weights, aligned, cfg)
        else:
            out = fused_experts(xw, weights.w13, weights.w2, topk_weights, aligned, cfg, scales.w13, scales.w2,
                                fp8_activations=self._fp8_activations(weights.w13.device))
        return out.to(out_dtype or x.dtype)

    def _fp8_activations(self, device: torch.device) -> bool:
        return fp8_dot_supported(device) if self.fp8_activations is None else self.fp8_activations

    def warm_up(self, weights: ExpertWeights, max_tokens: int, top_k: int = 2,
                num_experts: int | None = None) -> list[tuple[int, MoEConfig]]:
        """Compile every kernel variant serving up to `max_tokens` tokens can launch, so no JIT compile happens
        while serving (or inside a CUDA-graph capture).

        Runs the layer once at the first M of each M bucket with a distinct config (see `tuning.config_buckets`:
        the kernels compile once per config), with activations in the layer's compute dtype and fp32 router weights
        (what the layer passes), and aligns with both int64 (router) and int32 (token channel) expert ids. Also
        builds the cached device expert map, whose first build copies from the host. -> the (M, config) pairs run.
        Legend: M = tokens, K = `top_k`, D = hidden, E = local experts.
        """
        num_local, _, d = weights.w13.shape
        if num_local == 0 or max_tokens < 1:
            return []
        num_experts = num_experts or max(weights.expert_ids) + 1
        dev = weights.w13.device
        expert_map = weights.expert_map(num_experts)
        held = torch.tensor(weights.expert_ids, device=dev)  # [E] global ids of the local experts
        g = torch.Generator(device=dev).manual_seed(0)  # the process's own random state is left alone
        ran: list[tuple[int, MoEConfig]] = []
        for m, _, cfg in config_buckets(max_tokens, num_local, weights.w2.shape[2], dev, weights.dtype,
                                        weights.scales is not None):
            if any(cfg == seen for _, seen in ran):
                continue
            # Every local expert busy (when M * K allows), distinct experts per token where E >= K.
            ids = held[(torch.arange(m * top_k, device=dev) % num_local).view(m, top_k)]  # [M, K]
            x = torch.randn(m, d, generator=g, device=dev).to(weights.dtype)  # [M, D]
            weights_k = torch.full((m, top_k), 1.0 / top_k, device=dev)  # [M, K] fp32
            self(x, weights, ids, weights_k, num_experts)
            align_pairs(ids.to(torch.int32), expert_map, num_local, cfg.block_m)
            ran.append((m, cfg))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return ran


def fp8_dot_supported(device: torch.device) -> bool:
    """Whether the kernels on `device` multiply FP8 operands (W8A8): a GPU of compute capability 8.9 or later, not
    the interpreter."""
    if interpreting() or device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) \
        >= FP8_DOT_CAPABILITY


@lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
