"""Raw Triton kernels of the fused MoE (a grouped GEMM over stacked expert weights) and their launchers.

Legend: T = tokens, K = experts per token, P = T*K pairs (pair p = token * K + k), D = hidden, F = ffn,
E = local experts, C = padded pair capacity (see `align`), BM/BN/BK = BLOCK_M/N/K.

Each program owns BLOCK_M consecutive slots of the aligned pair list (all of one expert) and a column tile:
  gate_up: h[slot] = silu(x[token] @ w1[e]^T) * (x[token] @ w3[e]^T)   -> h [C, F], indexed by slot
  down:    y[pair] = topk_weight[pair] * (h[slot] @ w2[e]^T)           -> y [P, D] fp32
and the top-K sum y.view(T, K, D).sum(1) runs in torch (see `fused_experts`). Router weights stay fp32 (the
multiply happens on the fp32 accumulator, so a weight is never rounded to the activations' dtype).

Sizes that change every step (pairs, blocks) are not specialised on, so the compiled variants are exactly one per
(block config, dtype): `TritonMoEBackend.warm_up` compiles them all before serving.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cluster.kernels.align import AlignedPairs
from cluster.kernels.tuning import KernelConfig, MoEConfig, interpreting


@triton.jit
def _tile_coords(pid, num_blocks_m, num_blocks_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M consecutive M-blocks (mostly the same expert) sweep N together, so each weight
    # tile is fetched from HBM once and re-read from L2 by the other blocks of the group.
    per_group = GROUP_M * num_blocks_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit(do_not_specialize=["num_pairs", "num_blocks_m"])
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr, total_ptr,
    num_pairs, top_k, D, F, num_blocks_m,
    stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_hc, stride_hf,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_N // 2  # gate and up columns per program
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_blocks_m, tl.cdiv(F, HALF), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):  # past the real padded total (sizes are worst-case)
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] slots
    pair = tl.load(sorted_ids_ptr + offs_m)  # [BM] pair ids, sentinel P on padding
    row_ok = pair < num_pairs
    tok = (pair // top_k).to(tl.int64)  # [BM] token row to gather
    offs_f = pid_n * HALF + tl.arange(0, HALF)  # [HALF]
    col_ok = offs_f < F
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd  # [BM, BK]
    # Row offsets in int64: row * stride passes 2^31 once an expert's [2F, D] does (any layout, e.g. a strided view).
    w_e = w_ptr + e * stride_we
    g_ptrs = w_e + offs_f[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wd  # [BK, HALF] w1 rows
    u_ptrs = w_e + (F + offs_f)[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wd  # [BK, HALF] w3 rows
    acc_g = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if FP32_DOT:  # the interpreter mis-handles low-precision tl.dot
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xd
        g_ptrs += BLOCK_K * stride_wd
        u_ptrs += BLOCK_K * stride_wd

    h = acc_g * tl.sigmoid(acc_g) * acc_u  # SiLU(gate) * up, fp32; padding rows are 0
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hc + offs_f[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=col_ok[None, :])


# Router weights may arrive as a view at any offset of a received frame; their loads are gathers anyway, so their
# alignment is not specialised on (each parity of a frame's rows would otherwise compile a variant of its own).
@triton.jit(do_not_specialize=["num_pairs", "num_blocks_m"], do_not_specialize_on_alignment=["topk_w_ptr"])
def _down_kernel(
    h_ptr, w_ptr, y_ptr, topk_w_ptr, sorted_ids_ptr, block_expert_ptr, total_ptr,
    num_pairs, D, F, num_blocks_m,
    stride_hc, stride_hf, stride_we, stride_wd, stride_wf, stride_yp, stride_yd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_blocks_m, tl.cdiv(D, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] slots
    pair = tl.load(sorted_ids_ptr + offs_m)  # [BM]
    row_ok = pair < num_pairs
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)  # [BK] over F

    a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hc + offs_k[None, :] * stride_hf  # [BM, BK]
    b_ptrs = w_ptr + e * stride_we + offs_d[None, :].to(tl.int64) * stride_wd + offs_k[:, None] * stride_wf  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_ok = offs_k < F - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if FP32_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_hf
        b_ptrs += BLOCK_K * stride_wf

    w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)  # [BM] fp32 router weight of each pair
    acc = acc * w[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_yp + offs_d[None, :] * stride_yd
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(FP32_DOT, PRECISION): fp32 operands under the interpreter; exact fp32 dots (not tf32) for fp32 weights."""
    if interpreting():
        return True, None
    return False, "ieee" if dtype == torch.float32 else None


def _check_launch(a: torch.Tensor, w: torch.Tensor, aligned: AlignedPairs, cfg: KernelConfig, half_n: bool) -> None:
    """What a GPU would refuse or misread but the interpreter lets pass (it runs every dot in fp32, enforces no dot
    shape, and does not fault on reads past a buffer): one operand dtype, dot tiles >= 16, and an alignment made
    with this config's BLOCK_M (a larger BLOCK_M would read past `sorted_ids`)."""
    if a.dtype != w.dtype:
        raise ValueError(f"activations ({a.dtype}) and weights ({w.dtype}) must share a dtype: tl.dot takes one")
    n = cfg.BLOCK_N // 2 if half_n else cfg.BLOCK_N
    if min(cfg.BLOCK_M, n, cfg.BLOCK_K) < 16:
        raise ValueError(f"tl.dot needs tiles of at least 16 per side, {cfg} gives {cfg.BLOCK_M}x{n}x{cfg.BLOCK_K}")
    if aligned.sorted_ids.numel() != aligned.block_expert.numel() * cfg.BLOCK_M:
        raise ValueError(f"pairs aligned to {aligned.sorted_ids.numel()} slots in {aligned.block_expert.numel()} "
                         f"blocks, but the config's BLOCK_M is {cfg.BLOCK_M}")


def gate_up(x: torch.Tensor, w13: torch.Tensor, h: torch.Tensor, aligned: AlignedPairs, top_k: int,
            cfg: KernelConfig) -> None:
    """h [C, F] (row = aligned slot) <- SiLU(x[tok] @ w1[e]^T) * (x[tok] @ w3[e]^T). x [T, D], w13 [E, 2F, D]."""
    num_blocks_m = aligned.block_expert.numel()
    d, f = x.shape[1], w13.shape[1] // 2
    if num_blocks_m == 0:
        return
    _check_launch(x, w13, aligned, cfg, half_n=True)
    if w13.shape[2] != d or h.shape != (aligned.sorted_ids.numel(), f):
        raise ValueError(f"x {tuple(x.shape)}, w13 {tuple(w13.shape)} and h {tuple(h.shape)} do not fit")
    fp32_dot, precision = _dot_flags(w13.dtype)
    grid = (num_blocks_m * triton.cdiv(f, cfg.BLOCK_N // 2),)
    _gate_up_kernel[grid](
        x, w13, h, aligned.sorted_ids, aligned.block_expert, aligned.total,
        x.shape[0] * top_k, top_k, d, f, num_blocks_m,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0), h.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        FP32_DOT=fp32_dot, PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def down(h: torch.Tensor, w2: torch.Tensor, y: torch.Tensor, topk_weights: torch.Tensor, aligned: AlignedPairs,
         cfg: KernelConfig) -> None:
    """y [P, D] (row = pair) <- topk_weight[pair] * (h[slot] @ w2[e]^T) for local pairs; other rows untouched.
    h [C, F], w2 [E, D, F], topk_weights [T, K] fp32 contiguous."""
    if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
        raise ValueError(f"topk_weights must be contiguous fp32, got {topk_weights.dtype}")
    num_blocks_m = aligned.block_expert.numel()
    d, f = w2.shape[1], w2.shape[2]
    if num_blocks_m == 0:
        return
    _check_launch(h, w2, aligned, cfg, half_n=False)
    if h.shape != (aligned.sorted_ids.numel(), f) or y.shape != (topk_weights.numel(), d):
        raise ValueError(f"h {tuple(h.shape)}, w2 {tuple(w2.shape)} and y {tuple(y.shape)} do not fit "
                         f"{topk_weights.numel()} pairs")
    fp32_dot, precision = _dot_flags(w2.dtype)
    grid = (num_blocks_m * triton.cdiv(d, cfg.BLOCK_N),)
    _down_kernel[grid](
        h, w2, y, topk_weights, aligned.sorted_ids, aligned.block_expert, aligned.total,
        topk_weights.numel(), d, f, num_blocks_m,
        h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        FP32_DOT=fp32_dot, PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  aligned: AlignedPairs, cfg: MoEConfig) -> torch.Tensor:
    """[T, D] fp32: sum over each token's aligned (local) pairs of topk_weight * expert(x). x and weights share a
    dtype; topk_weights [T, K] (used in fp32); `aligned` from `align_pairs` with BLOCK_M = cfg.block_m."""
    t, k = topk_weights.shape
    f = w13.shape[1] // 2
    h = torch.empty(aligned.sorted_ids.numel(), f, dtype=x.dtype, device=x.device)  # [C, F]
    # Per-pair outputs then a torch sum over K rather than atomic adds into [T, D]: deterministic (fp32 atomics
    # reorder), no zero-init-and-add of the output on every tile, no bf16 atomics; the extra P*D*4 bytes of
    # traffic are small next to the expert weights. Zeroed because pairs routed elsewhere are never written.
    y = torch.zeros(t * k, x.shape[1], dtype=torch.float32, device=x.device)  # [P, D]
    gate_up(x, w13, h, aligned, k, cfg.gate_up)
    down(h, w2, y, topk_weights.to(torch.float32).contiguous(), aligned, cfg.down)
    return y.view(t, k, -1).sum(dim=1)
