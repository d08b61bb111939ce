"""Raw Triton kernels of the fused MoE (a grouped GEMM over stacked expert weights) and their launchers.

Legend: T = tokens, K = experts per token, P = T*K pairs (pair p = token * K + k), D = hidden, F = ffn,
E = local experts, C = padded pair capacity (see `align`), BM/BN/BK = BLOCK_M/N/K.

Each program owns BLOCK_M consecutive slots of the aligned pair list (all of one expert) and a column tile:
  gate_up: h[slot] = silu(x[token] @ w1[e]^T) * (x[token] @ w3[e]^T)   -> h [C, F], indexed by slot
  down:    y[pair] = topk_weight[pair] * (h[slot] @ w2[e]^T)           -> y [P, D] fp32
and the top-K sum y.view(T, K, D).sum(1) runs in torch (see `fused_experts`). Router weights stay fp32 (the
multiply happens on the fp32 accumulator, so a weight is never rounded to the activations' dtype).

FP8 weights (float8_e4m3fn, a float32 scale per output channel: `cluster.kernels.fp8`) run two ways:
  W8A16: each FP8 tile is widened to the activations' dtype (exactly, by integer ops) before the dot; any GPU.
  W8A8:  activations are quantized per row first (x per token; h per slot, between the kernels), the dot takes FP8
         operands (GPUs with FP8 tensor cores, sm_89+) and the accumulator is scaled by the row's scale.
Either way the weight scales multiply the fp32 accumulator once, after the K loop (a per-output-channel scale is
constant along K). W_FP8 / A_FP8 are constexprs: without them the kernels' code is what it was (the scale
arguments are passed and never read).

EVEN_K / EVEN_N (`even_tiles`, chosen at launch) say the layer's D and F fill whole tiles: the K loop and the column
loads and stores then drop those masks (their per-element compares and predicated copies); other shapes take the
masked path. Padding rows stay masked where they are gathered (x rows of gate_up, y rows of
down). The flags follow the layer's shape, fixed for a model, so the compiled variants are still exactly one per
(block config, dtype, FP8 mode): sizes that change every step (pairs, blocks) are not specialised on, and
`TritonMoEBackend.warm_up` compiles every variant before serving.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cluster.kernels.align import AlignedPairs
from cluster.kernels.fp8 import FP8, FP8_MAX, quantize_rows
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


@triton.jit
def _widen_e4m3(bits, dtype: tl.constexpr):
    # float8_e4m3fn bytes (loaded as uint8) -> `dtype` times 2^-8, exactly, by integer ops: GPUs before sm_89 have
    # no e4m3 type in Triton. The byte's exponent and mantissa shifted into a float16 are the number times 2^-8
    # (normals and subnormals alike, as both formats' subnormals start right below their exponent bias); the caller
    # multiplies by 2^8 once, on the accumulator.
    b = bits.to(tl.uint16)
    half = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
    return half.to(tl.float16, bitcast=True).to(dtype)


_E4M3_UNSHIFT = tl.constexpr(256.0)  # what `_widen_e4m3` leaves out


@triton.jit
def _load_tile(ptrs, offs_k, k_left, col_ok, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    # A [BK, BN] weight tile: masked only along the dimensions the shape does not fill (k_left = K - k0).
    if EVEN_K and EVEN_N:
        return tl.load(ptrs)
    elif EVEN_K:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    elif EVEN_N:
        return tl.load(ptrs, mask=(offs_k < k_left)[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=(offs_k < k_left)[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _load_cols(ptrs, col_ok, EVEN_N: tl.constexpr):
    # Per-output-channel values (the weight scales) of a column tile.
    if EVEN_N:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=col_ok, other=0.0)


@triton.jit(do_not_specialize=["num_pairs", "num_blocks_m"])
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr, total_ptr, x_scale_ptr, w_scale_ptr,
    num_pairs, top_k, D, F, num_blocks_m,
    stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_hc, stride_hf, stride_se,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, W_FP8: tl.constexpr, A_FP8: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
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
        if EVEN_K:  # only padding rows masked (token T past x's end): one predicate per row
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < D - k0)[None, :], other=0.0)
        g = _load_tile(g_ptrs, offs_k, D - k0, col_ok, EVEN_K, EVEN_N)
        u = _load_tile(u_ptrs, offs_k, D - k0, col_ok, EVEN_K, EVEN_N)
        if W_FP8 and not A_FP8:  # W8A16: the FP8 tile (bytes) widened to the activations' dtype
            g = _widen_e4m3(g, a.dtype)
            u = _widen_e4m3(u, a.dtype)
        if FP32_DOT:  # the interpreter mis-handles low-precision tl.dot
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xd
        g_ptrs += BLOCK_K * stride_wd
        u_ptrs += BLOCK_K * stride_wd

    if W_FP8:  # per output channel: gate columns offs_f, up columns F + offs_f of the expert's scales
        s_e = w_scale_ptr + e * stride_se
        s_g = _load_cols(s_e + offs_f, col_ok, EVEN_N)
        s_u = _load_cols(s_e + F + offs_f, col_ok, EVEN_N)
        if not A_FP8:
            s_g = s_g * _E4M3_UNSHIFT
            s_u = s_u * _E4M3_UNSHIFT
        acc_g = acc_g * s_g[None, :]
        acc_u = acc_u * s_u[None, :]
    if A_FP8:  # per token
        x_scale = tl.load(x_scale_ptr + tok, mask=row_ok, other=0.0)[:, None]
        acc_g = acc_g * x_scale
        acc_u = acc_u * x_scale
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # SiLU(gate) * up, fp32; padding rows are 0
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hc + offs_f[None, :] * stride_hf
    if EVEN_N:  # every slot row exists (C = blocks * BLOCK_M): nothing to mask
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty))
    else:
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=col_ok[None, :])


# Router weights may arrive as a view at any offset of a received frame; their loads are gathers anyway, so their
# alignment is not specialised on (each parity of a frame's rows would otherwise compile a variant of its own).
@triton.jit(do_not_specialize=["num_pairs", "num_blocks_m"], do_not_specialize_on_alignment=["topk_w_ptr"])
def _down_kernel(
    h_ptr, w_ptr, y_ptr, topk_w_ptr, sorted_ids_ptr, block_expert_ptr, total_ptr, h_scale_ptr, w_scale_ptr,
    num_pairs, D, F, num_blocks_m,
    stride_hc, stride_hf, stride_we, stride_wd, stride_wf, stride_yp, stride_yd, stride_se,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, W_FP8: tl.constexpr, A_FP8: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
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
        # h has a row for every slot: padding rows are read (zeros, or scratch past `total`) and never stored
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_k < F - k0)[None, :], other=0.0)
        b = _load_tile(b_ptrs, offs_k, F - k0, col_ok, EVEN_K, EVEN_N)
        if W_FP8 and not A_FP8:
            b = _widen_e4m3(b, a.dtype)
        if FP32_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_hf
        b_ptrs += BLOCK_K * stride_wf

    if W_FP8:
        s_d = _load_cols(w_scale_ptr + e * stride_se + offs_d, col_ok, EVEN_N)
        if not A_FP8:
            s_d = s_d * _E4M3_UNSHIFT
        acc = acc * s_d[None, :]
    if A_FP8:  # per slot (h's row)
        acc = acc * tl.load(h_scale_ptr + offs_m)[:, None]
    w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)  # [BM] fp32 router weight of each pair
    acc = acc * w[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_yp + offs_d[None, :] * stride_yd
    if EVEN_N:
        tl.store(y_ptrs, acc, mask=row_ok[:, None])
    else:
        tl.store(y_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


_FP8_MAX = tl.constexpr(FP8_MAX)
_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xr, stride_qr, BLOCK: tl.constexpr):
    # One program per row: its largest magnitude, then the row divided by amax / FP8_MAX (`fp8.quantize_rows`).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.load(x_ptr + row * stride_xr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), _FP8_MAX), _TINY)
    for k0 in range(0, K, BLOCK):
        ok = k0 + offs < K
        v = tl.load(x_ptr + row * stride_xr + k0 + offs, mask=ok, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(v, scale), -_FP8_MAX, _FP8_MAX)  # div_rn: rounded as torch divides
        tl.store(q_ptr + row * stride_qr + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + row, scale)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (FP8 [N, K], float32 scales [N]), per row (`fp8.quantize_rows`): one Triton program per row on a
    GPU (one launch where torch's ops take eight). Under the interpreter, torch's: the interpreter rounds
    float32 -> FP8 wrongly where rounding up carries into the exponent (126.7 becomes 64, not 128)."""
    if interpreting() or x.device.type == "cpu":
        return quantize_rows(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    n, k = x.shape
    q = torch.empty(n, k, dtype=FP8, device=x.device)
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        _quantize_rows_kernel[(n,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=1024, num_warps=4)
    return q, scale


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(FP32_DOT, PRECISION) for dot operands of `dtype` (the activations'): fp32 operands under the interpreter;
    exact fp32 dots (not tf32) for fp32."""
    if interpreting():
        return True, None
    return False, "ieee" if dtype == torch.float32 else None


def _check_launch(a: torch.Tensor, w: torch.Tensor, aligned: AlignedPairs, cfg: KernelConfig, half_n: bool,
                  a_scale: torch.Tensor | None, w_scale: torch.Tensor | None) -> None:
    """What a GPU would refuse or misread but the interpreter lets pass (it runs every dot in fp32, enforces no dot
    shape, and does not fault on reads past a buffer): one operand dtype (FP8 weights: the activations' widened to,
    or FP8 activations with their scales), dot tiles >= 16 (32 along K for FP8 operands), scales of one float32 per
    output channel, and an alignment made with this config's BLOCK_M (a larger BLOCK_M would read past
    `sorted_ids`)."""
    if w_scale is None:
        if a.dtype != w.dtype or a_scale is not None:
            raise ValueError(f"activations ({a.dtype}) and weights ({w.dtype}) must share a dtype: tl.dot takes one")
    else:
        if w.dtype != FP8 or a.dtype not in (FP8, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"scaled weights must be {FP8} with float activations or {FP8} ones, got weights "
                             f"{w.dtype} and activations {a.dtype}")
        if (a.dtype == FP8) != (a_scale is not None):
            raise ValueError("FP8 activations need their per-row scales, and only they")
        if w_scale.dtype != torch.float32 or w_scale.shape != w.shape[:2] or not w_scale.is_contiguous():
            raise ValueError(f"weight scales must be contiguous float32 {tuple(w.shape[:2])}, one per output "
                             f"channel, got {w_scale.dtype} {tuple(w_scale.shape)}")
        if a_scale is not None and (a_scale.dtype != torch.float32 or a_scale.shape != a.shape[:1]):
            raise ValueError(f"activation scales must be float32 {tuple(a.shape[:1])}, one per row")
    n = cfg.BLOCK_N // 2 if half_n else cfg.BLOCK_N
    if min(cfg.BLOCK_M, n, cfg.BLOCK_K) < 16 or (a.dtype == FP8 and cfg.BLOCK_K < 32):
        raise ValueError(f"tl.dot needs tiles of at least 16 per side (32 along K for FP8 operands), {cfg} gives "
                         f"{cfg.BLOCK_M}x{n}x{cfg.BLOCK_K}")
    if aligned.sorted_ids.numel() != aligned.block_expert.numel() * cfg.BLOCK_M:
        raise ValueError(f"pairs aligned to {aligned.sorted_ids.numel()} slots in {aligned.block_expert.numel()} "
                         f"blocks, but the config's BLOCK_M is {cfg.BLOCK_M}")


def _scale_args(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor | None,
                w_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int, bool, bool]:
    """(activation scale pointer, weight scale pointer, weight scales' expert stride, W_FP8, A_FP8). Without scales
    the pointers are the operands themselves: never read (the constexprs compile the reads out)."""
    return (a if a_scale is None else a_scale, w if w_scale is None else w_scale,
            0 if w_scale is None else w_scale.stride(0), w_scale is not None, a_scale is not None)


def even_tiles(k: int, n: int, block_k: int, block_n: int) -> dict[str, bool]:
    """The kernels' EVEN_K / EVEN_N: whether the reduced size K and the output columns N fill whole tiles, so that
    loads and stores along them skip their masks (every Mixtral shape does with the defaults)."""
    return {"EVEN_K": k % block_k == 0, "EVEN_N": n % block_n == 0}


def _weight_arg(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The weights as the kernel reads them: FP8 beside wider activations (W8A16) as their bytes, which it widens
    with integer ops (`_widen_e4m3`: Triton has no e4m3 type before sm_89); others as they are."""
    return w.view(torch.uint8) if w.dtype == FP8 and a.dtype != FP8 else w


def gate_up(x: torch.Tensor, w13: torch.Tensor, h: torch.Tensor, aligned: AlignedPairs, top_k: int,
            cfg: KernelConfig, x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> None:
    """h [C, F] (row = aligned slot) <- SiLU(x[tok] @ w1[e]^T) * (x[tok] @ w3[e]^T). x [T, D], w13 [E, 2F, D];
    FP8 w13 with w_scale [E, 2F] (and FP8 x with x_scale [T] for W8A8)."""
    num_blocks_m = aligned.block_expert.numel()
    d, f = x.shape[1], w13.shape[1] // 2
    if num_blocks_m == 0:
        return
    _check_launch(x, w13, aligned, cfg, True, x_scale, w_scale)
    if w13.shape[2] != d or h.shape != (aligned.sorted_ids.numel(), f):
        raise ValueError(f"x {tuple(x.shape)}, w13 {tuple(w13.shape)} and h {tuple(h.shape)} do not fit")
    fp32_dot, precision = _dot_flags(x.dtype)
    x_scale_arg, w_scale_arg, stride_se, w_fp8, a_fp8 = _scale_args(x, w13, x_scale, w_scale)
    grid = (num_blocks_m * triton.cdiv(f, cfg.BLOCK_N // 2),)
    _gate_up_kernel[grid](
        x, _weight_arg(w13, x), h, aligned.sorted_ids, aligned.block_expert, aligned.total, x_scale_arg, w_scale_arg,
        x.shape[0] * top_k, top_k, d, f, num_blocks_m,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0), h.stride(1), stride_se,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        FP32_DOT=fp32_dot, PRECISION=precision, W_FP8=w_fp8, A_FP8=a_fp8,
        **even_tiles(d, f, cfg.BLOCK_K, cfg.BLOCK_N // 2),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def down(h: torch.Tensor, w2: torch.Tensor, y: torch.Tensor, topk_weights: torch.Tensor, aligned: AlignedPairs,
         cfg: KernelConfig, h_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> None:
    """y [P, D] (row = pair) <- topk_weight[pair] * (h[slot] @ w2[e]^T) for local pairs; other rows untouched.
    h [C, F], w2 [E, D, F], topk_weights [T, K] fp32 contiguous; FP8 w2 with w_scale [E, D] (and FP8 h with
    h_scale [C] for W8A8)."""
    if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
        raise ValueError(f"topk_weights must be contiguous fp32, got {topk_weights.dtype}")
    num_blocks_m = aligned.block_expert.numel()
    d, f = w2.shape[1], w2.shape[2]
    if num_blocks_m == 0:
        return
    _check_launch(h, w2, aligned, cfg, False, h_scale, w_scale)
    if h.shape != (aligned.sorted_ids.numel(), f) or y.shape != (topk_weights.numel(), d):
        raise ValueError(f"h {tuple(h.shape)}, w2 {tuple(w2.shape)} and y {tuple(y.shape)} do not fit "
                         f"{topk_weights.numel()} pairs")
    fp32_dot, precision = _dot_flags(h.dtype)
    h_scale_arg, w_scale_arg, stride_se, w_fp8, a_fp8 = _scale_args(h, w2, h_scale, w_scale)
    grid = (num_blocks_m * triton.cdiv(d, cfg.BLOCK_N),)
    _down_kernel[grid](
        h, _weight_arg(w2, h), y, topk_weights, aligned.sorted_ids, aligned.block_expert, aligned.total,
        h_scale_arg, w_scale_arg,
        topk_weights.numel(), d, f, num_blocks_m,
        h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0), y.stride(1), stride_se,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        FP32_DOT=fp32_dot, PRECISION=precision, W_FP8=w_fp8, A_FP8=a_fp8,
        **even_tiles(f, d, cfg.BLOCK_K, cfg.BLOCK_N),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  aligned: AlignedPairs, cfg: MoEConfig, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, fp8_activations: bool = False) -> torch.Tensor:
    """[T, D] fp32: sum over each token's aligned (local) pairs of topk_weight * expert(x). x and weights share a
    dtype, or the weights are FP8 with scales w13_scale [E, 2F] and w2_scale [E, D] (then x is in the compute
    dtype, and `fp8_activations` runs W8A8 rather than W8A16); topk_weights [T, K] (used in fp32); `aligned` from
    `align_pairs` with BLOCK_M = cfg.block_m."""
    t, k = topk_weights.shape
    f = w13.shape[1] // 2
    h = torch.empty(aligned.sorted_ids.numel(), f, dtype=x.dtype, device=x.device)  # [C, F]
    # Per-pair outputs then a torch sum over K rather than atomic adds into [T, D]: deterministic (fp32 atomics
    # reorder), no zero-init-and-add of the output on every tile, no bf16 atomics; the extra P*D*4 bytes of
    # traffic are small next to the expert weights. Zeroed because pairs routed elsewhere are never written.
    y = torch.zeros(t * k, x.shape[1], dtype=torch.float32, device=x.device)  # [P, D]
    router = topk_weights.to(torch.float32).contiguous()
    if not fp8_activations:
        gate_up(x, w13, h, aligned, k, cfg.gate_up, w_scale=w13_scale)
        down(h, w2, y, router, aligned, cfg.down, w_scale=w2_scale)
    else:
        if w13_scale is None or w2_scale is None:
            raise ValueError("FP8 activations need FP8 weights with their scales")
        xq, x_scale = quantize_activations(x)  # [T, D] FP8, [T]
        gate_up(xq, w13, h, aligned, k, cfg.gate_up, x_scale, w13_scale)
        # h's rows past the used slots are never written: their scales are garbage that `down` never reads.
        hq, h_scale = quantize_activations(h)  # [C, F] FP8, [C]
        down(hq, w2, y, router, aligned, cfg.down, h_scale, w2_scale)
    return y.view(t, k, -1).sum(dim=1)
