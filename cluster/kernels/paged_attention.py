"""Raw Triton kernels of paged attention, and their launchers: decode (split-K), causal prefill, and the KV write.

Legend: T = new tokens, B = sequences, H = query heads, KV = kv heads, G = H / KV, Dh = head dim, N = cache blocks,
bs = block size, NB = block-table width, S = context splits, BN = keys per inner step, BQ = query tokens per tile.

The cache of one layer is k, v [KV, N, bs, Dh] (any strides, unit along Dh); a sequence's token j lives in block
`table[j // bs]` at row `j % bs`. No kernel gathers: each reads K/V rows where they live, through the table.

- decode: one program per (sequence, kv head, split); it owns the G query heads of its kv head, so every K/V row is
  read once for the whole group (one [G, Dh] x [Dh, BN] dot per step, G padded to 16 for tl.dot). With S > 1 each
  split covers 1/S of the context and writes fp32 partials (acc, max, sum) that `_reduce_kernel` merges
  (flash-decoding), so a batch of few long sequences still fills the GPU. S is a launch argument chosen from shapes
  alone (`decode_splits`), so the grid never depends on data.
- prefill: causal attention of a flat batch of query chunks (query_start_loc) over each sequence's cached prefix plus
  its own new tokens; one program per (query tile, kv head), a tile being BQ tokens x G heads of one sequence. The
  grid, T // BQ + B tiles, bounds any split of T tokens into B sequences, so it too is fixed by shapes; each program
  finds its sequence by a binary search over query_start_loc, and spare tiles return at once.
- store_kv: writes the step's new K/V rows into their slots; slot < 0 (padding) writes nothing.

Every launcher reads only shapes on the host (no .item(), no .tolist()), so all of them can be captured in a CUDA
graph. Nothing that changes from step to step is specialised on (the metadata's alignment, the table width, which
sequences a prefill launch covers), so the compiled variants are one per (dtype, head dim, group, splits), and
`benchmarks/compile_check.py` compiles them all ahead of time. Softmax is online, in fp32, in the log2 domain. A row
with context 0 (a padded decode row) outputs zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cluster.kernels.tuning import interpreting

_LOG2E = 1.4426950408889634


# Metadata (tables, lengths, slots, query starts) arrive as views into one packed int32 buffer at any offset, and the
# table width changes with the step: specialising on their alignment or value would compile new variants mid-serving.
@triton.jit(do_not_specialize=["stride_tb"], do_not_specialize_on_alignment=["tables_ptr", "seq_lens_ptr"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_ptr, stats_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_kh, stride_kn, stride_kt, stride_vh, stride_vn, stride_vt, stride_tb,
    stride_ot, stride_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(seq_lens_ptr + b)
    # This split's keys: a 1/S share of the context, whole BN steps, so splits never share a step.
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx)

    offs_g = tl.arange(0, G_PAD)  # [G_PAD] query heads of this kv head
    g_ok = offs_g < G
    offs_d = tl.arange(0, D_PAD)  # [D_PAD]
    d_ok = offs_d < HEAD_DIM
    heads = kvh * G + offs_g  # [G_PAD] query head ids
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G_PAD, D_PAD]
    if FP32_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    table = tables_ptr + b.to(tl.int64) * stride_tb

    m = tl.full([G_PAD], float("-inf"), tl.float32)  # running max (log2 units)
    l = tl.zeros([G_PAD], tl.float32)  # running sum
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN] token positions
        n_ok = offs_n < end
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)  # [BN]
        row_k = block * stride_kn + (offs_n % BLOCK_SIZE) * stride_kt  # [BN]
        row_v = block * stride_vn + (offs_n % BLOCK_SIZE) * stride_vt
        k = tl.load(k_base + row_k[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                    other=0.0)  # [D_PAD, BN]
        v = tl.load(v_base + row_v[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)  # [BN, D_PAD]
        if FP32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [G_PAD, BN]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every step holds at least one key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])  # [G_PAD, BN]
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    out_mask = g_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty context gives zeros
        tl.store(out_ptr + b.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # part [B, H, S, D_PAD] fp32, stats [B, H, S, 2] fp32 (max, sum), both contiguous
        row = (b.to(tl.int64) * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [G_PAD]
        tl.store(part_ptr + row[:, None] * D_PAD + offs_d[None, :], acc, mask=out_mask)
        tl.store(stats_ptr + row * 2, m, mask=g_ok)
        tl.store(stats_ptr + row * 2 + 1, l, mask=g_ok)


@triton.jit
def _reduce_kernel(
    part_ptr, stats_ptr, out_ptr, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)  # [S_PAD]
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, D_PAD)
    row = (b.to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS + offs_s  # [S_PAD]
    m = tl.load(stats_ptr + row * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(stats_ptr + row * 2 + 1, mask=s_ok, other=0.0)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all > float("-inf"), m_all, 0.0)  # every split empty (context 0): all weights 0 below
    w = tl.exp2(m - m_all)  # empty splits weigh exp2(-inf) = 0
    total = tl.sum(w * l, 0)
    acc = tl.load(part_ptr + row[:, None] * D_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)  # [S_PAD, D_PAD]
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [D_PAD]
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["first_seq", "num_seqs", "stride_tb"],
            do_not_specialize_on_alignment=["tables_ptr", "seq_lens_ptr", "qsl_ptr"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    qk_scale, first_seq, num_seqs,
    stride_qt, stride_qh, stride_kh, stride_kn, stride_kt, stride_vh, stride_vn, stride_vt, stride_tb,
    stride_ot, stride_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    # Sequence i owns tiles from (qsl[i] - qsl[0]) // BQ + i on: the last sequence whose first tile <= ours.
    q0 = tl.load(qsl_ptr + first_seq)
    lo: tl.int32 = 0  # annotated: loop-carried values must be tensors, never constexprs (a literal is one)
    hi: tl.int32 = num_seqs
    while lo < hi:  # lo ends one past the last sequence whose first tile is <= ours (sequence 0's is tile 0)
        mid = (lo + hi) // 2
        if (tl.load(qsl_ptr + first_seq + mid) - q0) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    idx = lo - 1
    seq = first_seq + idx
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    local = tile - ((q_start - q0) // BLOCK_Q + idx)  # tile index within the sequence
    if local * BLOCK_Q >= q_len:  # a spare tile
        return
    ctx = tl.load(seq_lens_ptr + seq)
    prefix = ctx - q_len  # tokens cached before this chunk

    M: tl.constexpr = BLOCK_Q * G_PAD
    offs_m = tl.arange(0, M)  # [M] rows = (token, head) pairs
    tok = local * BLOCK_Q + offs_m // G_PAD  # [M] token index within the chunk
    g = offs_m % G_PAD
    row_ok = (tok < q_len) & (g < G)
    pos = prefix + tok  # [M] absolute position of each query
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_qt + (kvh * G + g)[:, None] * stride_qh
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D_PAD]
    if FP32_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    kv_end = tl.minimum(ctx, prefix + (local + 1) * BLOCK_Q)  # keys past the tile's last query are masked anyway

    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D_PAD], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN]
        n_ok = offs_n < kv_end
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        row_k = block * stride_kn + (offs_n % BLOCK_SIZE) * stride_kt
        row_v = block * stride_vn + (offs_n % BLOCK_SIZE) * stride_vt
        k = tl.load(k_base + row_k[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + row_v[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [M, BN]
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= pos[:, None]), s, float("-inf"))
        # Key 0 is visible to every row, so after the first step every row's max is finite.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_ot + (kvh * G + g)[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize_on_alignment=["slots_ptr"])
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ch, stride_cn, stride_ct, stride_dh, stride_dn, stride_dt,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:  # padding: touch nothing
        return
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    block, row = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + offs_d, mask=d_ok)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + offs_d, mask=d_ok)
    tl.store(kc_ptr + h.to(tl.int64) * stride_ch + block * stride_cn + row * stride_ct + offs_d,
             k.to(kc_ptr.dtype.element_ty), mask=d_ok)
    tl.store(vc_ptr + h.to(tl.int64) * stride_dh + block * stride_dn + row * stride_dt + offs_d,
             v.to(vc_ptr.dtype.element_ty), mask=d_ok)


# -- launchers ---------------------------------------------------------------------------------------------------


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(FP32_DOT, PRECISION): fp32 operands under the interpreter (it mis-handles low-precision tl.dot); exact fp32
    dots (not tf32) for fp32 caches on a GPU."""
    if interpreting():
        return True, None
    return False, "ieee" if dtype == torch.float32 else None


class _Tiles(NamedTuple):
    decode_n: int  # keys per decode step
    prefill_rows: int  # (token, head) rows per prefill tile
    prefill_n: int  # keys per prefill step
    num_warps: int


def _tiles(dtype: torch.dtype) -> _Tiles:
    """Tile sizes by where the kernel runs. fp32 on a GPU takes exact (ieee) dots, which run on FMA units with whole
    tiles in registers: the smallest tiles tl.dot takes keep every variant from spilling (larger ones, or 8 warps,
    spill in some: benchmarks/compile_check.py measures registers and spills per variant). The interpreter runs each
    program in Python: few big tiles are faster there."""
    if interpreting():
        return _Tiles(32, 64, 32, 4)
    if dtype == torch.float32:
        return _Tiles(16, 16, 16, 4)
    return _Tiles(64, 64, 32, 4)


def _head_pad(head_dim: int) -> int:
    """Head dim padded to a power of two of at least 16 (tl.dot's smallest K; the padding is masked)."""
    return max(16, triton.next_power_of_2(head_dim))


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 out: torch.Tensor) -> tuple[int, int, int]:
    """(G, KV, Dh) after checking q, out [*, H, Dh] against k/v caches [KV, N, bs, Dh] with unit stride along Dh.
    Checked here because the interpreter forgives both: it runs every dot in fp32 (a GPU refuses mixed operand
    dtypes at compile time) and never faults on a stride it was not told about."""
    heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = k_cache.shape[0]
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim or heads % kv_heads or out.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)} / out {tuple(out.shape)} do not fit caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, out and the caches need unit stride along the head dim")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"q ({q.dtype}) and the caches ({k_cache.dtype}, {v_cache.dtype}) must share a dtype: "
                         "tl.dot takes operands of one dtype")
    return heads // kv_heads, kv_heads, head_dim


def decode_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int, num_sms: int) -> int:
    """How many splits of the context a decode launch uses, from shapes alone (the same for every step of one
    CUDA-graph bucket): enough programs for about four per SM, each split still at least 256 keys long."""
    if batch * kv_heads == 0:
        return 1
    wanted = -(-4 * num_sms // (batch * kv_heads))
    longest = max(1, max_blocks * block_size // 256)
    return max(1, min(wanted, longest, 16))


def decode_split_counts(kv_heads: int, max_blocks: int, block_size: int, num_sms: int) -> range:
    """Every split count `decode_splits` can pick on this GPU for tables up to `max_blocks` wide, whatever the batch
    and width: 1 up to its largest (batch 1, widest table), since the length cap takes every value below. Each is a
    compiled variant, so a warm-up that runs them all leaves no decode launch to compile while serving."""
    return range(1, decode_splits(1, kv_heads, max_blocks, block_size, num_sms) + 1)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, out: torch.Tensor, num_splits: int = 1,
                 block_n: int | None = None) -> torch.Tensor:
    """out [B, H, Dh] <- each row's query attending over its first seq_lens[b] cached tokens.

    q [B, H, Dh] (one token per sequence); k/v_cache [KV, N, bs, Dh]; block_tables [B, NB] int32/int64;
    seq_lens [B] int32 (0 = padding row: its output is zeros). `out` may be a row slice of a larger tensor.
    """
    batch = q.shape[0]
    if batch == 0:
        return out
    group, kv_heads, head_dim = _check_cache(q, k_cache, v_cache, out)
    if block_tables.shape[0] < batch or seq_lens.shape[0] < batch:
        raise ValueError(f"{batch} rows need as many block tables and lengths, got {tuple(block_tables.shape)} / "
                         f"{tuple(seq_lens.shape)}")
    block_size = k_cache.shape[2]
    d_pad = _head_pad(head_dim)
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    tiles = _tiles(k_cache.dtype)
    block_n = block_n or tiles.decode_n
    fp32_dot, precision = _dot_flags(k_cache.dtype)
    if num_splits > 1:
        part = torch.empty(batch, group * kv_heads, num_splits, d_pad, dtype=torch.float32, device=q.device)
        stats = torch.empty(batch, group * kv_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = stats = out  # unused
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part, stats,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        G=group, G_PAD=g_pad, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, FP32_DOT=fp32_dot, PRECISION=precision, num_warps=tiles.num_warps, num_stages=2,
    )
    if num_splits > 1:
        _reduce_kernel[(batch, group * kv_heads)](
            part, stats, out, out.stride(0), out.stride(1),
            NUM_HEADS=group * kv_heads, HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=num_splits,
            S_PAD=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, out: torch.Tensor,
                  first_seq: int = 0, num_seqs: int | None = None, block_q: int | None = None,
                  block_n: int | None = None) -> torch.Tensor:
    """Causal attention of sequences first_seq .. first_seq+num_seqs-1 of a flat batch, each over its cache.

    q, out [T, H, Dh] (the whole flat batch; rows of other sequences are left alone); block_tables [B, NB];
    seq_lens [B] int32, tokens cached after this step (the new ones already written); query_start_loc [B+1] int32,
    sequence b's new tokens are rows qsl[b]..qsl[b+1]-1 at positions seq_lens[b]-len .. seq_lens[b]-1.
    """
    num_seqs = block_tables.shape[0] - first_seq if num_seqs is None else num_seqs
    if num_seqs == 0:
        return out
    group, kv_heads, head_dim = _check_cache(q, k_cache, v_cache, out)
    end = first_seq + num_seqs
    if block_tables.shape[0] < end or seq_lens.shape[0] < end or query_start_loc.shape[0] < end + 1:
        raise ValueError(f"sequences {first_seq}..{end - 1} need tables, lengths and query starts: got "
                         f"{tuple(block_tables.shape)} / {tuple(seq_lens.shape)} / {tuple(query_start_loc.shape)}")
    block_size = k_cache.shape[2]
    d_pad = _head_pad(head_dim)
    g_pad = triton.next_power_of_2(group)
    tiles = _tiles(k_cache.dtype)
    block_q = block_q or max(1, tiles.prefill_rows // g_pad)  # at least 16 rows: tl.dot's smallest M
    block_n = block_n or tiles.prefill_n
    fp32_dot, precision = _dot_flags(k_cache.dtype)
    # T bounds these sequences' tokens, so T // BQ + their number bounds their tiles; spare ones return at once.
    grid = (q.shape[0] // block_q + num_seqs, kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * _LOG2E, first_seq, num_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        G=group, G_PAD=g_pad, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_Q=block_q,
        BLOCK_N=block_n, FP32_DOT=fp32_dot, PRECISION=precision, num_warps=tiles.num_warps, num_stages=2,
    )
    return out


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache/v_cache [KV, N, bs, Dh] at flat slot s (block s // bs, row s % bs) <- k/v [T, KV, Dh]; s < 0 skips."""
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    fits = (k_cache.shape[0], k_cache.shape[3]) == (kv_heads, head_dim) and slot_mapping.shape[0] >= tokens
    if v.shape != k.shape or k_cache.shape != v_cache.shape or not fits:
        raise ValueError(f"k/v {tuple(k.shape)} / {tuple(v.shape)} and {slot_mapping.shape[0]} slots do not fit "
                         f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k, v and the caches need unit stride along the head dim")
    _store_kv_kernel[(tokens, kv_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[2], num_warps=1,
    )
