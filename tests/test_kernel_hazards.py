"""What a GPU enforces and the Triton interpreter forgives, checked on whatever runs the kernels (the `device` fixture).

- Offsets past 2^31 elements: `row * stride` in int32 wraps (on a GPU, and in the interpreter's numpy int32 alike), so
  a big KV cache or expert weight would be read or written somewhere else. The tensors here are strided views over
  one allocation just past 2^31 elements (4 GiB of bf16) of which the kernels touch a few rows: on CPU the rest is
  never paged in; a GPU allocates it for real.
- Launch checks: operands of one dtype for tl.dot (the interpreter computes every dot in fp32, a GPU refuses mixed
  dtypes at compile time), unit stride where the kernel assumes it, dot tiles of at least 16, and an alignment that
  matches the config (else the kernel reads past `sorted_ids`).

Legend: KV = kv heads, G = query heads per kv head, N = cache blocks, bs = block size, Dh = head dim, D = hidden,
F = ffn, S = the large stride.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.kernels.align import align_pairs
from cluster.kernels.fused_moe import down, gate_up
from cluster.kernels.paged_attention import paged_decode, paged_prefill, store_kv
from cluster.kernels.tuning import KernelConfig, default_config
from cluster.moe.triton_backend import TritonMoEBackend
from cluster.moe.weights import ExpertWeights, _expert_map

BIG = 2**31
KV, G, BS, DH, N = 2, 2, 16, 64, 4
DTYPE = torch.bfloat16
TOL = 1e-2  # bf16 against float64


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def _big_cache(layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [KV, N, bs, Dh] over one buffer, K and V interleaved. "block": block N-1 starts past 2^31 elements
    (a cache of many blocks); "head": kv head 1 starts past 2^31 (a head-major cache of many blocks)."""
    head, block = BS * DH, N * BS * DH
    if layout == "block":
        s = _round16(-(-BIG // (N - 1)))
        strides, v_offset, numel = (head, s, DH, 1), KV * head, (N - 1) * s + 2 * KV * head
    else:
        s = _round16(BIG)
        strides, v_offset, numel = (s, head, DH, 1), block, s + 2 * block
    buf = torch.empty(numel, dtype=DTYPE, device=device)
    k = buf.as_strided((KV, N, BS, DH), strides, 0)
    v = buf.as_strided((KV, N, BS, DH), strides, v_offset)
    assert ((N - 1) * k.stride(1) if layout == "block" else (KV - 1) * k.stride(0)) >= BIG
    return k, v


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """float64 [n, H, Dh]: queries at `positions` over keys/values [ctx, KV, Dh], causal."""
    keys = keys.double().repeat_interleave(G, 1)  # [ctx, H, Dh]
    values = values.double().repeat_interleave(G, 1)
    scores = torch.einsum("ihd,jhd->hij", q.double(), keys) * q.shape[-1] ** -0.5  # [H, n, ctx]
    ctx = keys.shape[0]
    scores.masked_fill_(torch.arange(ctx)[None, None, :] > torch.tensor(positions)[None, :, None], float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), values)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.cpu().double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("layout", ["block", "head"])
def test_attention_offsets_past_int32(layout: str, device: torch.device) -> None:
    """store_kv writes, decode and prefill read K/V rows more than 2^31 elements into the cache."""
    seed = 11
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = _big_cache(layout, device)
    tables = [[3, 1, 2], [0]]  # block 3 is the far one in the "block" layout; head 1 is far in every block
    contexts = [40, 9]
    slots = [t[p // BS] * BS + p % BS for t, ctx in zip(tables, contexts) for p in range(ctx)]
    keys = torch.randn(len(slots), KV, DH, generator=g).to(DTYPE)  # [T, KV, Dh] every cached row, in order
    values = torch.randn(len(slots), KV, DH, generator=g).to(DTYPE)
    slot_mapping = torch.tensor(slots, dtype=torch.int32, device=device)
    store_kv(keys.to(device), values.to(device), k_cache, v_cache, slot_mapping)
    blocks, rows = torch.tensor(slots) // BS, torch.tensor(slots) % BS
    for cache, want in ((k_cache, keys), (v_cache, values)):
        got = cache[:, blocks.to(device), rows.to(device)].cpu().transpose(0, 1)  # [T, KV, Dh]
        assert torch.equal(got, want), f"seed {seed}, {layout}: store_kv wrote elsewhere"

    table = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32, device=device)
    lens = torch.tensor(contexts, dtype=torch.int32, device=device)
    per_seq = [(keys[:40], values[:40]), (keys[40:], values[40:])]
    q = torch.randn(2, KV * G, DH, generator=g).to(DTYPE)  # one decode token per sequence
    for splits in (1, 2):
        out = paged_decode(q.to(device), k_cache, v_cache, table, lens, DH ** -0.5,
                           torch.empty(q.shape, dtype=DTYPE, device=device), num_splits=splits)
        want = torch.cat([_attend(q[i:i + 1], *per_seq[i], [ctx - 1]) for i, ctx in enumerate(contexts)])
        err = _rel(out, want)
        assert err < TOL, f"seed {seed}, {layout}, {splits} splits: decode relative error {err:.2e}"

    chunks = [8, 9]  # the last 8 tokens of sequence 0, all of sequence 1
    qp = torch.randn(sum(chunks), KV * G, DH, generator=g).to(DTYPE)
    qsl = torch.tensor([0, 8, 17], dtype=torch.int32, device=device)
    out = paged_prefill(qp.to(device), k_cache, v_cache, table, lens, qsl, DH ** -0.5,
                        torch.empty(qp.shape, dtype=DTYPE, device=device))
    want = torch.cat([_attend(qp[:8], *per_seq[0], list(range(32, 40))),
                      _attend(qp[8:], *per_seq[1], list(range(9)))])
    err = _rel(out, want)
    assert err < TOL, f"seed {seed}, {layout}: prefill relative error {err:.2e}"


@pytest.mark.parametrize("far", ["w13", "w2"])
def test_moe_weight_offsets_past_int32(far: str, device: torch.device) -> None:
    """One expert whose w13 (or w2) rows lie S elements apart, the last gate row (or w2 row) past 2^31 elements: the
    fused kernels read the right rows. (8 GiB of address space for w13, 4 GiB for w2; a few pages touched.)"""
    seed, t, d, f = 5, 6, 64, 64
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(1, 2 * f, d, generator=g) / d**0.5).to(DTYPE)  # [1, 2F, D]
    w2 = (torch.randn(1, d, f, generator=g) / f**0.5).to(DTYPE)  # [1, D, F]
    dense = w13 if far == "w13" else w2
    rows, cols = dense.shape[1], dense.shape[2]
    s = _round16(-(-BIG // ((f if far == "w13" else d) - 1)))  # gate row F-1 / down row D-1 starts past 2^31
    buf = torch.empty((rows - 1) * s + cols, dtype=DTYPE, device=device)
    strided = buf.as_strided(dense.shape, (rows * s, s, 1))
    strided.copy_(dense.to(device))
    weights = ExpertWeights(strided if far == "w13" else w13.to(device), strided if far == "w2" else w2.to(device),
                            (0,))
    x = torch.randn(t, d, generator=g).to(DTYPE)
    ids = torch.zeros(t, 1, dtype=torch.int64)
    tw = torch.rand(t, 1, generator=g) + 0.5  # fp32 router weights
    backend = TritonMoEBackend()
    out = backend(x.to(device), backend.prepare(weights), ids.to(device), tw.to(device), 1, out_dtype=torch.float32)
    xd = x.double()
    want = tw.double() * ((F.silu(xd @ w13[0, :f].double().T) * (xd @ w13[0, f:].double().T)) @ w2[0].double().T)
    err = _rel(out, want)
    assert err < TOL, f"seed {seed}, far {far}: relative error {err:.2e}"


def test_head_dim_below_16(device: torch.device) -> None:
    """A head dim under tl.dot's smallest K (16) is padded and masked: it compiles on a GPU and attends exactly."""
    seed, head_dim, contexts = 3, 8, [21, 5]
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(KV, 4, BS, head_dim, device=device)
    v_cache = torch.zeros_like(k_cache)
    tables = [[2, 0], [3]]
    slots = [t[p // BS] * BS + p % BS for t, ctx in zip(tables, contexts) for p in range(ctx)]
    keys = torch.randn(len(slots), KV, head_dim, generator=g)  # [T, KV, Dh] every cached row, in order
    values = torch.randn(len(slots), KV, head_dim, generator=g)
    store_kv(keys.to(device), values.to(device), k_cache, v_cache, torch.tensor(slots, device=device))
    table = torch.tensor([[2, 0], [3, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor(contexts, dtype=torch.int32, device=device)
    per_seq = [(keys[:21], values[:21]), (keys[21:], values[21:])]
    q = torch.randn(2, KV * G, head_dim, generator=g)
    out = paged_decode(q.to(device), k_cache, v_cache, table, lens, head_dim ** -0.5,
                       torch.empty_like(q, device=device))
    want = torch.cat([_attend(q[i:i + 1], *per_seq[i], [ctx - 1]) for i, ctx in enumerate(contexts)])
    assert _rel(out, want) < 1e-5, f"seed {seed}: decode relative error {_rel(out, want):.2e}"
    qp = torch.randn(sum(contexts), KV * G, head_dim, generator=g)
    qsl = torch.tensor([0, 21, 26], dtype=torch.int32, device=device)
    out = paged_prefill(qp.to(device), k_cache, v_cache, table, lens, qsl, head_dim ** -0.5,
                        torch.empty_like(qp, device=device))
    want = torch.cat([_attend(qp[:21], *per_seq[0], list(range(21))), _attend(qp[21:], *per_seq[1], list(range(5)))])
    assert _rel(out, want) < 1e-5, f"seed {seed}: prefill relative error {_rel(out, want):.2e}"


def test_attention_launchers_refuse_what_a_gpu_would(device: torch.device) -> None:
    k = torch.zeros(KV, N, BS, DH, dtype=DTYPE, device=device)
    tables = torch.zeros(2, 1, dtype=torch.int32, device=device)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    q = torch.zeros(2, KV * G, DH, dtype=DTYPE, device=device)
    with pytest.raises(ValueError, match="share a dtype"):
        paged_decode(q.float(), k, k, tables, lens, 1.0, torch.empty_like(q.float()))
    strided_out = torch.empty(2, KV * G, 2 * DH, dtype=DTYPE, device=device)[..., ::2]  # [B, H, Dh], stride 2
    with pytest.raises(ValueError, match="unit stride"):
        paged_decode(q, k, k, tables, lens, 1.0, strided_out)
    with pytest.raises(ValueError, match="block tables"):
        paged_decode(q, k, k, tables[:1], lens, 1.0, torch.empty_like(q))
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="query starts"):
        paged_prefill(q, k, k, tables, lens, qsl[:2], 1.0, torch.empty_like(q))
    new = torch.zeros(3, KV + 1, DH, dtype=DTYPE, device=device)  # one kv head too many
    with pytest.raises(ValueError, match="do not fit"):
        store_kv(new, new, k, k, torch.zeros(3, dtype=torch.int32, device=device))


def test_moe_launchers_refuse_what_a_gpu_would(device: torch.device) -> None:
    d, f, t = 64, 96, 4
    w13 = torch.zeros(2, 2 * f, d, device=device)
    w2 = torch.zeros(2, d, f, device=device)
    ids = torch.tensor([[0, 1]] * t, device=device)
    cfg = default_config(t)
    aligned = align_pairs(ids, _expert_map((0, 1), 2, device), 2, cfg.block_m)
    h = torch.zeros(aligned.sorted_ids.numel(), f, device=device)
    x = torch.zeros(t, d, device=device)
    with pytest.raises(ValueError, match="share a dtype"):
        gate_up(x.to(torch.bfloat16), w13, h, aligned, 2, cfg.gate_up)
    with pytest.raises(ValueError, match="at least 16"):
        gate_up(x, w13, h, aligned, 2, KernelConfig(cfg.block_m, 64, 8))
    with pytest.raises(ValueError, match="BLOCK_M"):
        gate_up(x, w13, h, aligned, 2, KernelConfig(2 * cfg.block_m, 64, 64))
    y = torch.zeros(t * 2, d, device=device)
    with pytest.raises(ValueError, match="share a dtype"):
        down(h.to(torch.bfloat16), w2, y, torch.ones(t, 2, device=device), aligned, cfg.down)
