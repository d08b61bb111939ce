"""Fused-MoE Triton kernels (interpreter on CPU) against a float64 reference from the definition.

Legend: T = tokens, K = experts per token, D = hidden, F = ffn, E = experts, P = T*K pairs, C = padded capacity.
Inputs are fresh random every run; the seed is in every failure message.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from cluster.kernels import tuning  # noqa: E402
from cluster.kernels.align import align_pairs, capacity  # noqa: E402
from cluster.kernels.fused_moe import down, gate_up  # noqa: E402
from cluster.moe.backend import TorchMoEBackend  # noqa: E402
from cluster.moe.triton_backend import TritonMoEBackend  # noqa: E402
from cluster.moe.weights import ExpertWeights, _expert_map  # noqa: E402

# ||out - ref|| / ||ref|| bounds: fp32 sums in a different order; bf16/fp16 also round the [P, F] intermediate
# and the output (2^-8 relative per element, averaging down over D).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.fixture
def seed() -> int:
    s = time.time_ns() % 2**31
    torch.manual_seed(s)
    return s


def make_weights(num_experts: int, held: list[int], d: int, f: int, dtype: torch.dtype) -> ExpertWeights:
    w13 = torch.randn(len(held), 2 * f, d) / d**0.5  # [E_local, 2F, D]
    w2 = torch.randn(len(held), d, f) / f**0.5  # [E_local, D, F]
    return ExpertWeights(w13.to(dtype), w2.to(dtype), tuple(held))


def route(t: int, k: int, num_experts: int, allowed: list[int] | None = None, skew: float = 0.0):
    """topk_ids [T, K] distinct experts per token (only from `allowed`), skewed towards low ids; weights [T, K]."""
    allowed = list(range(num_experts)) if allowed is None else allowed
    logits = torch.full((t, num_experts), float("-inf"))
    logits[:, allowed] = torch.randn(t, len(allowed)) - skew * torch.arange(len(allowed), dtype=torch.float32)
    probs = torch.softmax(logits, dim=-1)
    ids = torch.multinomial(probs, k)  # without replacement
    return ids, torch.softmax(torch.randn(t, k), dim=-1)


def reference(x: torch.Tensor, w: ExpertWeights, ids: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
    """float64, per token: sum_k w_k * W2_e (silu(W1_e x) * W3_e x) over the experts the shard holds."""
    f = w.w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e not in w.expert_ids:
                continue
            i = w.expert_ids.index(e)
            w1, w3, w2 = w.w13[i, :f].double(), w.w13[i, f:].double(), w.w2[i].double()
            out[t] += float(tw[t, k]) * (w2 @ (F.silu(w1 @ xt) * (w3 @ xt)))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def test_align(seed: int) -> None:
    held = [1, 4, 6]
    for t, k, bm in [(1, 2, 32), (37, 2, 16), (64, 3, 32), (5, 2, 64)]:
        ids, _ = route(t, k, 8, skew=0.5)
        emap = _expert_map(tuple(held), 8, torch.device("cpu"))
        a = align_pairs(ids, emap, len(held), bm)
        p = t * k
        cap = capacity(p, len(held), bm)
        assert a.sorted_ids.shape == (cap,) and a.block_expert.shape == (cap // bm,), seed
        local = emap[ids.flatten()]  # [P]
        counts = torch.bincount(local[local >= 0].long(), minlength=len(held))
        total = int(((counts + bm - 1) // bm * bm).sum())
        assert int(a.total) == total, seed
        real = a.sorted_ids[a.sorted_ids < p]
        # every local pair exactly once, nothing else
        assert sorted(real.tolist()) == torch.nonzero(local >= 0).flatten().tolist(), seed
        assert (a.sorted_ids[total:] == p).all(), seed  # beyond the total: sentinel only
        for b in range(cap // bm):
            blk = a.sorted_ids[b * bm:(b + 1) * bm]
            e = int(a.block_expert[b])
            if b * bm >= total:
                assert e == -1, seed
                continue
            pairs = blk[blk < p].long()
            assert len(pairs) > 0, seed  # padding never fills a whole block
            assert (local[pairs] == e).all(), seed  # single-expert blocks
        # padding per expert: exactly the round-up to a block
        assert int((a.sorted_ids[:total] == p).sum()) == total - len(real), seed


def test_align_nothing_local() -> None:
    a = align_pairs(torch.tensor([[0, 2], [3, 7]]), _expert_map((1, 4), 8, torch.device("cpu")), 2, 32)
    assert int(a.total) == 0 and (a.block_expert == -1).all() and (a.sorted_ids == 4).all()


@pytest.mark.parametrize("t, held, dtype", [
    (21, [1, 4, 6], torch.float32),  # few rows per expert: the batched path
    (300, [1, 4, 6], torch.float32),  # > batched_max_rows on some expert: the per-expert path
    (1, list(range(8)), torch.float32),
    (150, list(range(8)), torch.bfloat16),  # bf16 on CPU pads row counts to the bucket
    (40, [0, 7], torch.bfloat16),
])
def test_torch_backend_matches_reference(seed: int, t: int, held: list[int], dtype: torch.dtype) -> None:
    w = make_weights(8, held, 64, 96, dtype)
    x = torch.randn(t, 64).to(dtype)
    ids, tw = route(t, 2, 8, skew=0.3)
    err = rel_err(TorchMoEBackend()(x, w, ids, tw.to(dtype), 8), reference(x, w, ids, tw.to(dtype)))
    assert err < TOL[dtype], f"seed {seed}: rel err {err}"


CASES = {
    # name: (T, K, D, F, held experts of 8, routing restricted to, skew)
    "uneven": (45, 2, 96, 160, list(range(8)), None, 0.6),
    "empty_experts": (19, 2, 64, 96, list(range(8)), [0, 3, 5], 0.0),
    "single_token": (1, 2, 128, 256, list(range(8)), None, 0.0),
    "subset_shard": (33, 2, 64, 224, [1, 4, 6], None, 0.2),
    "top3_one_expert_shard": (13, 3, 80, 128, [2], None, 0.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend(case: str, dtype: torch.dtype, seed: int) -> None:
    t, k, d, f, held, allowed, skew = CASES[case]
    w = make_weights(8, held, d, f, dtype)
    x = torch.randn(t, d + 16).to(dtype)[:, 8:8 + d]  # non-contiguous rows
    ids, tw = route(t, k, 8, allowed, skew)
    out = TritonMoEBackend()(x, w, ids, tw.to(dtype), 8)
    assert out.shape == (t, d) and out.dtype == dtype
    err = rel_err(out, reference(x, w, ids, tw.to(dtype)))
    assert err < TOL[dtype], f"{case} seed {seed}: rel err {err} >= {TOL[dtype]}"


def test_triton_fp16_int32_ids(seed: int) -> None:
    w = make_weights(8, list(range(8)), 64, 96, torch.float16)
    x = torch.randn(9, 64).half()
    ids, tw = route(9, 2, 8)
    err = rel_err(TritonMoEBackend()(x, w, ids.int(), tw, 8), reference(x, w, ids, tw))
    assert err < TOL[torch.float16], f"seed {seed}: rel err {err}"


def test_triton_no_local_tokens(seed: int) -> None:
    w = make_weights(8, [1, 4, 6], 64, 96, torch.float32)
    ids, tw = route(7, 2, 8, allowed=[0, 2, 3, 5, 7])
    out = TritonMoEBackend()(torch.randn(7, 64), w, ids, tw, 8)
    assert out.shape == (7, 64) and (out == 0).all(), seed
    empty = TritonMoEBackend()(torch.randn(0, 64), w, ids[:0], tw[:0], 8)
    assert empty.shape == (0, 64)


def test_kernels_write_everything(seed: int) -> None:
    """Launch the two kernels on NaN-poisoned buffers: every slot/pair they own is written, nothing else."""
    t, k, d, f, held = 23, 2, 64, 96, [0, 2, 3, 5, 7]
    w = make_weights(8, held, d, f, torch.float32)
    x = torch.randn(t, d)
    ids, tw = route(t, k, 8, skew=0.4)
    cfg = tuning.default_config(t)
    emap = _expert_map(tuple(held), 8, torch.device("cpu"))
    a = align_pairs(ids, emap, len(held), cfg.block_m)
    total, p = int(a.total), t * k

    h = torch.full((a.sorted_ids.numel(), f), float("nan"))  # [C, F]
    gate_up(x, w.w13, h, a, k, cfg.gate_up)
    assert not h[:total].isnan().any(), f"seed {seed}: gate_up left slots unwritten"
    assert (h[:total][a.sorted_ids[:total] == p] == 0).all(), seed  # padding rows are exact zeros
    assert h[total:].isnan().all(), seed  # blocks past the total are skipped

    y = torch.full((p, d), float("nan"))  # [P, D]
    down(h, w.w2, y, tw.contiguous(), a, cfg.down)
    local = emap[ids.flatten()] >= 0  # [P]
    assert not y[local].isnan().any(), f"seed {seed}: down left local pairs unwritten"
    assert y[~local].isnan().all(), seed  # pairs held elsewhere untouched
    ref = reference(x, w, ids, tw)
    err = rel_err(y.nan_to_num(0.0).view(t, k, d).sum(1), ref)
    assert err < TOL[torch.float32], f"seed {seed}: rel err {err}"


def test_tuning_table(tmp_path, monkeypatch) -> None:
    table = {"1": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
             "256": {"gate_up": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64},
                     "down": {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8}}}
    (tmp_path / tuning.config_file_name(8, 512, "Fake GPU")).write_text(json.dumps(table))
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuning, "device_name", lambda device: "Fake_GPU")
    tuning.load_configs.cache_clear()
    try:
        assert tuning.get_config(3, 8, 512, "cuda").block_m == 16
        big = tuning.get_config(1000, 8, 512, "cuda")
        assert big.block_m == 64 and big.down.BLOCK_N == 256 and big.down.num_warps == 8
        assert tuning.get_config(3, 8, 1024, "cuda") == tuning.default_config(3)  # no file for this shape
    finally:
        tuning.load_configs.cache_clear()
    with pytest.raises(ValueError):
        tuning.MoEConfig(tuning.KernelConfig(16, 64, 64), tuning.KernelConfig(32, 64, 64))


def test_model_on_the_triton_backend_matches_torch(tiny_dir):
    """The whole tiny model with its experts on the Triton kernels gives the torch backend's logits."""
    from cluster.model.kv_cache import ContiguousKVCache
    from cluster.model.loader import load_model

    logits = []
    tokens = torch.randint(0, 32768, (11,))
    for backend in ("torch", "triton"):
        lm = load_model(tiny_dir, "fp32", backend=backend)
        c = lm.config
        cache = ContiguousKVCache(c.num_layers, 1, 16, c.num_kv_heads, c.head_dim)
        logits.append(lm.model.compute_logits(lm.model(tokens, cache.begin_step([0], [11]), cache)))
    rel = ((logits[1] - logits[0]).norm() / logits[0].norm()).item()
    assert rel < TOL[torch.float32], rel
