"""Fused Triton kernels for a decoder layer's glue, and their launchers: RMSNorm with the residual add, rotary, and
the router's top-k.

Legend: T = tokens, D = hidden, H = query heads, KV = kv heads, Dh = head dim, E = experts, K = experts per token.

Why: in torch each is a string of elementwise kernels (RMSNorm ~8, rotary ~14, the router's top-k and softmax a few,
the residual add one more), each reading and writing all of its [T, D] tensor, and at decode sizes every launch
costs more than the bytes it moves. Fused, each is one pass: read once, write once.

Each kernel computes what the torch code it replaces computes (`cluster.model.layers`, `cluster.model.router`),
rounding to the activations' dtype where that code rounds:
- add_rms_norm: r = x + residual (rounded to the dtype), y = weight * (r * rsqrt(mean(r^2) + eps)).to(dtype), the
  sum of squares in fp32. One program per row.
- rotary: q and k rotated in place (the HF rotate-half layout), cos/sin of positions * inv_freq in fp32 rounded to
  the dtype; each product and the sum rounded to the dtype as torch's `q * cos + rotate_half(q) * sin` rounds them.
  One program per (token, block of heads) over the q heads then the k heads, so one launch does both.
- route: top-k of the fp32 logits, softmax over the k chosen; optionally adds each (token, k)'s count weight to its
  expert's counter (`cluster.moe.load.ExpertStep.add`'s index_add_, summed per program, one atomic per expert).
  Ties: among equal logits the lower expert id is chosen first (torch.topk leaves its order unspecified). A NaN
  logit counts as the largest (as in torch.topk), so ids are always in range.

Graph-safe: the launchers read only shapes on the host, allocate their outputs by shape, and launch fixed grids;
nothing a step changes (the token count, a view's alignment) is specialised on, so each kernel compiles once per
model shape and dtype. FMA contraction is off: a fused multiply-add would round once where torch rounds twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# -- kernels --------------------------------------------------------------------------------------------------------


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, r_ptr, D, eps, stride_x, stride_res, stride_y, stride_r,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)  # [BD] columns
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + offs, mask=ok, other=0.0)
        r = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)  # torch adds in fp32 and rounds to the dtype
        tl.store(r_ptr + row * stride_r + offs, r, mask=ok)
    else:
        r = x
    rf = r.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt_rn(tl.sum(rf * rf, axis=0) / D + eps)
    n = (rf * inv_rms).to(x.dtype)  # rounded to the activations' dtype before the weight, as the torch code does
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    y = w.to(tl.float32) * n.to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotate_heads(base, first, heads, stride_h, cos, sin, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    # Heads [first, first + BH) of one token, in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), each product and
    # the sum rounded to the dtype.
    offs_h = first + tl.arange(0, BLOCK_H)  # [BH]
    offs_d = tl.arange(0, HALF_PAD)  # [HP]
    mask = (offs_h < heads)[:, None] & (offs_d < HALF)[None, :]
    p1 = base + offs_h[:, None] * stride_h + offs_d[None, :]  # [BH, HP] first halves
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    c, s = cos[None, :], sin[None, :]  # [1, HP] fp32 holding dtype values
    o1 = (f1 * c).to(dt).to(tl.float32) - (f2 * s).to(dt).to(tl.float32)
    o2 = (f2 * c).to(dt).to(tl.float32) + (f1 * s).to(dt).to(tl.float32)
    tl.store(p1, o1.to(dt), mask=mask)
    tl.store(p1 + HALF, o2.to(dt), mask=mask)


# Positions arrive as a view into the step's packed int32 metadata at an offset that moves with T.
@triton.jit(do_not_specialize_on_alignment=["pos_ptr"])
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, inv_freq_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)  # head block: the q heads' blocks first, then the k heads'
    offs_d = tl.arange(0, HALF_PAD)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    freqs = pos * tl.load(inv_freq_ptr + offs_d, mask=offs_d < HALF, other=0.0)  # [HP] fp32, as torch multiplies
    dt = q_ptr.dtype.element_ty
    cos = tl.cos(freqs).to(dt).to(tl.float32)  # cos/sin rounded to the dtype, as the torch code rounds them
    sin = tl.sin(freqs).to(dt).to(tl.float32)
    q_blocks = tl.cdiv(H, BLOCK_H)
    if hb < q_blocks:
        _rotate_heads(q_ptr + t * stride_qt, hb * BLOCK_H, H, stride_qh, cos, sin, HALF, HALF_PAD, BLOCK_H)
    else:
        _rotate_heads(k_ptr + t * stride_kt, (hb - q_blocks) * BLOCK_H, KV, stride_kh, cos, sin, HALF, HALF_PAD,
                      BLOCK_H)


# T changes every step, and a layer's counter row sits at an offset of layer * E: neither may add variants.
@triton.jit(do_not_specialize=["T"], do_not_specialize_on_alignment=["counts_ptr", "count_w_ptr"])
def _route_kernel(logits_ptr, w_out_ptr, ids_out_ptr, counts_ptr, count_w_ptr, T, stride_l, stride_cw,
                  E: tl.constexpr, K: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, COUNT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, E_PAD)[None, :]  # [1, EP]
    logits = tl.load(logits_ptr + rows64[:, None] * stride_l + cols, mask=row_ok[:, None] & (cols < E),
                     other=0.0).to(tl.float32)  # [BT, EP]
    logits = tl.where(logits != logits, float("inf"), logits)  # NaN ranks first, as in torch.topk
    free = (cols < E) & (rows[:, None] >= 0)  # [BT, EP] experts not chosen yet (padding columns never)
    kcols = tl.arange(0, K_PAD)[None, :]  # [1, KP]
    top = tl.full([BLOCK_T, K_PAD], float("-inf"), tl.float32)  # [BT, KP] chosen logits, best first
    ids = tl.zeros([BLOCK_T, K_PAD], tl.int64)  # [BT, KP]
    if COUNT:
        count_w = tl.zeros([BLOCK_T, E_PAD], tl.int64)  # [BT, EP] each row's count weight at its chosen experts
    for k in tl.static_range(K):
        best = tl.max(tl.where(free, logits, float("-inf")), axis=1)  # [BT]
        pick = tl.min(tl.where(free & (logits == best[:, None]), cols, E_PAD), axis=1)  # [BT] lowest id of the best
        chosen = cols == pick[:, None]  # [BT, EP]
        free = free & ~chosen
        top = tl.where(kcols == k, best[:, None], top)
        ids = tl.where(kcols == k, pick[:, None].to(tl.int64), ids)
        if COUNT:
            cw = tl.load(count_w_ptr + rows64 * stride_cw + k, mask=row_ok, other=0)  # [BT]
            count_w += tl.where(chosen, cw[:, None].to(tl.int64), 0)
    # softmax over the chosen k (the first is the largest), in fp32 as torch.softmax computes it
    e = tl.where(kcols < K, tl.exp(top - tl.max(top, axis=1)[:, None]), 0.0)  # [BT, KP]
    weights = e / tl.sum(e, axis=1)[:, None]
    out_mask = row_ok[:, None] & (kcols < K)
    tl.store(w_out_ptr + rows64[:, None] * K + kcols, weights, mask=out_mask)
    tl.store(ids_out_ptr + rows64[:, None] * K + kcols, ids, mask=out_mask)
    if COUNT:
        per_expert = tl.sum(count_w, axis=0)  # [EP] this block's counts
        experts = tl.arange(0, E_PAD)
        tl.atomic_add(counts_ptr + experts, per_expert, mask=(experts < E) & (per_expert != 0))


# -- launchers ------------------------------------------------------------------------------------------------------

_ROUTE_ROWS = 16  # tokens per router program


def _norm_warps(block_d: int) -> int:
    """Warps for one row of BLOCK_D: ~16 elements a thread, 4 to 16 warps."""
    return min(16, max(4, block_d // 512))


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] (+ residual [T, D]), weight [D] -> (y [T, D], r [T, D]): r = x + residual in x's dtype (x itself
    without a residual), y = weight * norm(r), in the dtype torch promotes weight and x to."""
    if x.dim() != 2 or weight.shape != (x.shape[1],) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)} and residual "
                         f"{None if residual is None else tuple(residual.shape)} do not fit [T, D], [D], [T, D]")
    if x.stride(1) != 1 or weight.stride(0) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("x, weight and residual need unit stride along D")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"residual {residual.dtype} and x {x.dtype} differ")
    tokens, dim = x.shape
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    r = x if residual is None else torch.empty_like(x)
    if tokens == 0:
        return y, r
    res = x if residual is None else residual
    block_d = triton.next_power_of_2(dim)
    _add_rms_norm_kernel[(tokens,)](
        x, res, weight, y, r, dim, eps, x.stride(0), res.stride(0), y.stride(0), r.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_D=block_d, num_warps=_norm_warps(block_d), enable_fp_fusion=False,
    )
    return y, r


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, Dh] and k [T, KV, Dh] in place by positions [T] (int) and inv_freq [Dh/2] fp32 (one
    launch); returns (q, k)."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    half = head_dim // 2
    if (k.shape[0], k.shape[2]) != (tokens, head_dim) or positions.shape != (tokens,) or head_dim % 2 \
            or inv_freq.shape != (half,):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)} and inv_freq "
                         f"{tuple(inv_freq.shape)} do not fit [T, H, Dh], [T, KV, Dh], [T], [Dh/2]")
    if q.dtype != k.dtype or inv_freq.dtype != torch.float32:
        raise ValueError(f"q {q.dtype} and k {k.dtype} must share a dtype, inv_freq be fp32 (got {inv_freq.dtype})")
    if q.stride(2) != 1 or k.stride(2) != 1 or inv_freq.stride(0) != 1:
        raise ValueError("q, k and inv_freq need unit stride along the head dim")
    if tokens == 0:
        return q, k
    block_h = min(8, triton.next_power_of_2(max(heads, kv_heads)))
    grid = (tokens, triton.cdiv(heads, block_h) + triton.cdiv(kv_heads, block_h))
    _rotary_kernel[grid](
        q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        H=heads, KV=kv_heads, HALF=half, HALF_PAD=triton.next_power_of_2(half), BLOCK_H=block_h, num_warps=4,
        enable_fp_fusion=False,
    )
    return q, k


def route(router_logits: torch.Tensor, k: int, counts: torch.Tensor | None = None,
          count_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] (any float dtype) -> (topk_weights [T, K] fp32, topk_ids [T, K] int64), as
    `cluster.model.router.route`. With `counts` [E] (int64) and `count_weights` [T, K] (int64, a token's weight
    for each of its k choices), adds count_weights[t, j] to counts[topk_ids[t, j]], as `ExpertStep.add` does."""
    tokens, experts = router_logits.shape
    if not 0 < k <= experts:
        raise ValueError(f"top-{k} of {experts} experts")
    if router_logits.stride(1) != 1:
        raise ValueError("router_logits need unit stride along E")
    if (counts is None) != (count_weights is None):
        raise ValueError("counts and count_weights come together")
    if counts is not None and (counts.shape != (experts,) or count_weights.shape != (tokens, k)
                               or count_weights.stride(1) != 1):
        raise ValueError(f"counts {tuple(counts.shape)} and count_weights {tuple(count_weights.shape)} do not fit "
                         f"[{experts}] and [{tokens}, {k}] (unit stride along K)")
    device = router_logits.device
    weights = torch.empty(tokens, k, dtype=torch.float32, device=device)
    ids = torch.empty(tokens, k, dtype=torch.int64, device=device)
    if tokens == 0:
        return weights, ids
    count = counts is not None
    _route_kernel[(triton.cdiv(tokens, _ROUTE_ROWS),)](
        router_logits, weights, ids, counts if count else ids, count_weights if count else ids, tokens,
        router_logits.stride(0), count_weights.stride(0) if count else 0,
        E=experts, K=k, E_PAD=triton.next_power_of_2(experts), K_PAD=triton.next_power_of_2(k),
        BLOCK_T=_ROUTE_ROWS, COUNT=count, num_warps=1,
    )
    return weights, ids
