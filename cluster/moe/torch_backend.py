"""The torch MoE backend: plain matmuls over the (token, expert) pairs grouped by expert.

It runs any dtype on any device, so it is the fallback of the CPU kernel and the reference the Triton kernels are
checked against. `group_pairs` is shared with the CPU kernel, which takes the pairs in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.kernels.fp8 import FP8
from cluster.moe.weights import ExpertWeights


class TorchMoEBackend:
    """Group the (token, expert) pairs by local expert, then run the experts' matmuls.

    Every local expert busy with few rows (decode of a batch): one padded batched matmul over all of them,
    [E, M, D] x [E, D, 2F], since small matmuls are bandwidth-bound and one call beats E calls. Otherwise (prefill,
    or a few tokens that leave experts idle): one matmul pair per busy expert, so idle experts' weights are not read.
    On CPU in bf16/fp16 row counts are padded to a multiple of `row_bucket`: oneDNN compiles a kernel for every new
    matmul shape, and the rows per expert change every step.
    FP8 weights are converted (exactly) into the activations' dtype for each call, only those of the experts it
    runs, and their per-output-channel scales multiply the matmul's output: no dequantized copy outlives the call.
    Its layout is the `ExpertWeights` themselves; it syncs with the host (row counts), so no CUDA graph captures it.

    Legend: E = local experts, M = padded rows per expert, P = T*K pairs.
    """

    name = "torch"
    graph_safe = False
    row_bucket = 32
    batched_max_rows = 64

    def supports(self, weights: ExpertWeights) -> bool:
        return True

    def prepare(self, weights: ExpertWeights) -> ExpertWeights:
        return weights

    def warm_up(self, weights: ExpertWeights, max_tokens: int, top_k: int, num_experts: int) -> None:
        """Nothing to compile."""

    def __call__(self, x: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, num_experts: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        t, k = topk_ids.shape
        n_local = len(weights.expert_ids)
        out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)  # [T, D] fp32 accumulator
        if t == 0 or n_local == 0:
            return out.to(out_dtype or x.dtype)
        key, order, counts = group_pairs(weights, topk_ids, num_experts)
        pair_weight = torch.cat([topk_weights.flatten().float(), topk_weights.new_zeros(1, dtype=torch.float32)])
        if int(counts.max()) <= self.batched_max_rows and bool((counts > 0).all()):
            self._batched(x, weights, order, key, counts, pair_weight, k, out)
        else:
            self._per_expert(x, weights, order, counts.tolist(), pair_weight, k, out)
        return out.to(out_dtype or x.dtype)

    def _batched(self, x: torch.Tensor, weights: ExpertWeights, order: torch.Tensor, key: torch.Tensor,
                 counts: torch.Tensor, pair_weight: torch.Tensor, k: int, out: torch.Tensor) -> None:
        n_local, p = counts.numel(), order.numel()
        m = _round_up(int(counts.max()), self.row_bucket if _pads(x) else 1)
        starts = counts.cumsum(0) - counts  # [E]
        skey = key[order]
        valid = skey < n_local
        rank = torch.arange(p, device=x.device) - starts[skey.clamp(max=n_local - 1)]
        slots = torch.full((n_local * m,), p, dtype=torch.long, device=x.device)  # [E*M] pair id; p = padding
        slots[(skey * m + rank)[valid]] = order[valid]
        tokens = torch.where(slots < p, slots // k, 0)  # padding reads token 0 and gets weight 0
        scales = weights.scales
        h = torch.bmm(x[tokens].view(n_local, m, -1), _matrix(weights.w13, x).transpose(1, 2))  # [E, M, 2F]
        if scales is not None:
            h = (h * scales.w13.unsqueeze(1)).to(x.dtype)
        ffn = weights.w2.shape[2]
        h = F.silu(h[..., :ffn]) * h[..., ffn:]
        y = torch.bmm(h, _matrix(weights.w2, x).transpose(1, 2))  # [E, M, D]
        if scales is not None:
            y = y * scales.w2.unsqueeze(1)
        y = y.flatten(0, 1).float()  # [E*M, D]
        out.index_add_(0, tokens, y * pair_weight[slots].unsqueeze(1))

    def _per_expert(self, x: torch.Tensor, weights: ExpertWeights, order: torch.Tensor, counts: list[int],
                    pair_weight: torch.Tensor, k: int, out: torch.Tensor) -> None:
        pad = _pads(x)
        ffn = weights.w2.shape[2]
        scales = weights.scales
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            tokens = pairs // k
            rows = x[_pad_rows(tokens, self.row_bucket)] if pad else x[tokens]  # [n or padded, D]
            h = rows @ _matrix(weights.w13[e], x).t()  # [., 2F]
            if scales is not None:
                h = (h * scales.w13[e]).to(x.dtype)
            h = F.silu(h[:, :ffn]) * h[:, ffn:]
            y = (h @ _matrix(weights.w2[e], x).t())[:n].float()  # [n, D]
            if scales is not None:
                y = y * scales.w2[e]
            y = y * pair_weight[pairs].unsqueeze(1)
            out.index_add_(0, tokens, y)


def group_pairs(weights: ExpertWeights, topk_ids: torch.Tensor,
                num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, expert) pairs by local expert: key [P] (local index; E for experts held elsewhere), order [P] (pair
    ids sorted by key, stable), counts [E] (pairs per local expert). Legend: P = T*K pairs, E = local experts."""
    n_local = len(weights.expert_ids)
    local = weights.expert_map(num_experts)[topk_ids.flatten().long()].long()
    key = torch.where(local >= 0, local, n_local)  # held elsewhere -> sorts last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_local + 1)[:n_local]
    return key, order, counts


def _matrix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`w` as the matmul with `x` takes it: FP8 converted into x's dtype (exact: every e4m3 value is a bf16, fp16
    and fp32 value); other weights as they are."""
    return w.to(x.dtype) if w.dtype == FP8 else w


def _pads(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_rows(index: torch.Tensor, bucket: int) -> torch.Tensor:
    """`index` extended (with repeats of its first entry) to a multiple of `bucket`."""
    extra = -len(index) % bucket
    return torch.cat([index, index[:1].expand(extra)]) if extra else index
