"""The fused glue kernels (`cluster.kernels.glue`: RMSNorm with its residual add, rotary, the router's top-k) against
float64 references from the definition, and against the torch code of the layers they replace; then the whole tiny
model with its glue fused against its torch path.

Legend: T = tokens, D = hidden, H = query heads, KV = kv heads, Dh = head dim, E = experts, K = experts per token.

The references compute in float64 and round to the activations' dtype exactly where the torch code rounds (the
residual sum, the normed value, cos/sin, each rotary product and sum), so each output is checked to a bound of a few
roundings: fp32 ulps, or bf16's 2^-8 (2^-7 under the interpreter, which truncates fp32 -> bf16 where a GPU rounds
to nearest). Kernels run on the
`device` fixture (compiled on a GPU, the interpreter on CPU); references on CPU copies. Inputs are fresh random
draws from seeded generators (the seed is in every failure's parameters).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from cluster.checkpoint.presets import preset  # noqa: E402
from cluster.kernels import glue  # noqa: E402
from cluster.kernels.tuning import interpreting  # noqa: E402
from cluster.model import glue_selector  # noqa: E402
from cluster.model.layers import RMSNorm, RotaryEmbedding  # noqa: E402
from cluster.model.moe import MoELayer  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
TOKENS = [1, 7, 33]  # one, odd, more than a router program's 16 rows
SHAPES = {name: preset(name) for name in ("tiny", "mini", "mixtral-8x7b", "mixtral-8x22b")}
EPS = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(dtype: torch.dtype) -> float:
    """The relative error one rounding to `dtype` may leave here: bf16 rounds to nearest on a GPU (2^-8) and
    truncates under the interpreter (2^-7); fp32 allows a few ulps (the kernels compute in fp32, cos/sin and the
    mean of squares included, against float64)."""
    if dtype == torch.float32:
        return 2**-21
    return 2**-7 if interpreting() else 2**-8


def _assert_within(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, roundings: int,
                   scale: torch.Tensor | None = None) -> None:
    """|out - ref| <= roundings * unit * (|ref| + scale) elementwise: out (any device) against a float64 CPU
    reference; `scale` the magnitudes of terms rounded before a sum that may cancel."""
    out = out.cpu().double()
    bound = roundings * _unit(dtype) * (ref.abs() + (0 if scale is None else scale)) + 1e-30
    excess = ((out - ref).abs() / bound).max().item()
    assert excess <= 1, f"error {excess:.2f}x the bound of {roundings} roundings; max |out - ref| = " \
                        f"{(out - ref).abs().max().item():.3e}"


# -- RMSNorm with the residual add -------------------------------------------------------------------------------------


def _norm_reference(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r) in float64 from CPU inputs: r = x + residual rounded to x's dtype, n = r / rms(r) rounded, y = w * n."""
    dtype = x.dtype
    r = x if residual is None else (x.double() + residual.double()).to(dtype)
    rf = r.double()
    n = (rf / torch.sqrt(rf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype).double()
    return weight.double() * n, rf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("dim, tokens", [(64, 1), (64, 33), (512, 7), (4096, 1), (4096, 7), (6144, 3)])
def test_add_rms_norm_matches_float64(dim: int, tokens: int, residual: bool, dtype: torch.dtype,
                                      device: torch.device) -> None:
    g = _gen(dim + tokens)
    x = (torch.randn(tokens, dim, generator=g) * 3).to(dtype)
    res = torch.randn(tokens, dim, generator=g).to(dtype) if residual else None
    weight = (1 + 0.5 * torch.randn(dim, generator=g)).to(dtype)
    y, r = glue.add_rms_norm(x.to(device), weight.to(device), EPS, None if res is None else res.to(device))
    want_y, want_r = _norm_reference(x, weight, res)
    assert y.dtype == r.dtype == dtype
    _assert_within(y, want_y, dtype, 3)  # r, the normed value, y
    if dtype == torch.float32:  # one fp32 add, correctly rounded either way
        assert torch.equal(r.cpu().double(), want_r)
    else:
        _assert_within(r, want_r, dtype, 2)  # the kernel's rounding of the sum and the reference's


def test_add_rms_norm_reads_strided_rows_and_promotes_as_torch(device: torch.device) -> None:
    """Rows at a stride (a view of a wider buffer), and an fp32 weight over bf16 activations: fp32 out, as torch's
    `weight * n` promotes."""
    g = _gen(5)
    wide = torch.randn(9, 200, generator=g).to(torch.bfloat16)
    x, res = wide[:, :96], wide[:, 100:196]  # [9, 96] views, row stride 200
    weight = torch.randn(96, generator=g)
    y, r = glue.add_rms_norm(x.to(device), weight.to(device), EPS, res.to(device))
    want_y, want_r = _norm_reference(x, weight, res)
    assert y.dtype == torch.float32 and r.dtype == torch.bfloat16
    _assert_within(y, want_y, torch.bfloat16, 3)  # r and the normed value round to bf16; y is fp32
    _assert_within(r, want_r, torch.bfloat16, 2)


# -- rotary ------------------------------------------------------------------------------------------------------------


def _rotary_reference(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((q, its scale), (k, its scale)) float64 from CPU inputs, rounding where the torch code does: cos/sin of the
    fp32 angles, each product, the sum; the scale of an element is |product 1| + |product 2|."""
    dtype = q.dtype
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, Dh/2] fp32, the angle torch computes
    cos = freqs.double().cos().to(dtype).double()[:, None, :]  # [T, 1, Dh/2]
    sin = freqs.double().sin().to(dtype).double()[:, None, :]

    def rd(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).double()

    def rotate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x.double().chunk(2, dim=-1)
        a, b, c, d = x1 * cos, x2 * sin, x2 * cos, x1 * sin
        out = torch.cat([rd(a) - rd(b), rd(c) + rd(d)], dim=-1)
        return out, torch.cat([a.abs() + b.abs(), c.abs() + d.abs()], dim=-1)

    return rotate(q), rotate(k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rotary_matches_float64_in_place(shape: str, tokens: int, dtype: torch.dtype, device: torch.device) -> None:
    """q and k rotated in place inside a fused qkv buffer (row stride (H + 2 KV) Dh); v, between them, untouched."""
    c = SHAPES[shape]
    g = _gen(tokens + c.head_dim)
    h, kv, dh = c.num_heads, c.num_kv_heads, c.head_dim
    qkv = (torch.randn(tokens, (h + 2 * kv) * dh, generator=g) * 2).to(dtype)
    positions = torch.randint(0, c.max_position_embeddings, (tokens,), generator=g, dtype=torch.int32)
    inv_freq = RotaryEmbedding(dh, c.rope_theta).inv_freq
    q, k = qkv[:, :h * dh].view(tokens, h, dh), qkv[:, (h + kv) * dh:].view(tokens, kv, dh)
    (want_q, scale_q), (want_k, scale_k) = _rotary_reference(positions, q, k, inv_freq)
    on = qkv.to(device)
    q_on, k_on = on[:, :h * dh].view(tokens, h, dh), on[:, (h + kv) * dh:].view(tokens, kv, dh)
    out_q, out_k = glue.rotary(positions.to(device), q_on, k_on, inv_freq.to(device))
    assert out_q.data_ptr() == q_on.data_ptr() and out_k.data_ptr() == k_on.data_ptr()
    assert out_q.dtype == out_k.dtype == dtype
    # per product: cos/sin and the product round; then the sum
    _assert_within(out_q, want_q, dtype, 2, scale_q)
    _assert_within(out_k, want_k, dtype, 2, scale_k)
    assert torch.equal(on[:, h * dh:(h + kv) * dh].cpu(), qkv[:, h * dh:(h + kv) * dh])  # v


# -- router ------------------------------------------------------------------------------------------------------------


def _distinct_logits(tokens: int, experts: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """[T, E] logits without ties in any row: distinct multiples of 1/8 in [-4, 4), exact in bf16."""
    rows = [torch.randperm(64, generator=g)[:experts] for _ in range(tokens)]
    return (torch.stack(rows).float() / 8 - 4).to(dtype)


def _route_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] float64, ids [T, K]): the k largest logits by a full sort, softmax over them in float64."""
    order = torch.sort(logits.double(), dim=-1, descending=True, stable=True)
    top, ids = order.values[:, :k], order.indices[:, :k]
    return torch.softmax(top, dim=-1), ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33, 256])
@pytest.mark.parametrize("experts, k", [(8, 2), (6, 3), (8, 1)], ids=["E8K2", "E6K3", "E8K1"])
def test_route_matches_float64(experts: int, k: int, tokens: int, dtype: torch.dtype, device: torch.device) -> None:
    logits = _distinct_logits(tokens, experts, dtype, _gen(tokens * experts + k))
    weights, ids = glue.route(logits.to(device), k)
    want_w, want_ids = _route_reference(logits, k)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(weights.cpu().double(), want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tokens", [1, 33, 256])
def test_route_adds_counts_as_the_expert_load_does(tokens: int, device: torch.device) -> None:
    """counts[layer] += index_add of each (token, k)'s count weight at its expert (`ExpertStep.add`): into a row of
    an [L, E] buffer that already holds counts, other rows untouched; padding rows (weight 0) add nothing."""
    from cluster.moe.load import ExpertStep

    g = _gen(tokens)
    logits = _distinct_logits(tokens, 8, torch.bfloat16, g)
    counts = torch.randint(0, 100, (3, 8), generator=g)  # [L, E]
    count_w = torch.randint(0, 2, (tokens, 1), generator=g).expand(tokens, 2).contiguous()  # [T, K]: 1 real, 0 pad
    want = counts.clone()
    _, want_ids = _route_reference(logits, 2)
    ExpertStep(want, count_w).add(1, want_ids)
    on_counts = counts.to(device)
    _, ids = glue.route(logits.to(device), 2, on_counts[1], count_w.to(device))
    assert torch.equal(ids.cpu(), want_ids)
    assert torch.equal(on_counts.cpu(), want)


def test_route_breaks_ties_towards_the_lower_expert(device: torch.device) -> None:
    """The documented tie rule: equal logits are chosen lowest id first (torch.topk's order is unspecified)."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0], [0.5] * 5, [3.0, -1.0, 3.0, 3.0, 3.0]])
    weights, ids = glue.route(logits.to(device), 3)
    assert ids.cpu().tolist() == [[1, 2, 4], [0, 1, 2], [0, 2, 3]]
    torch.testing.assert_close(weights.cpu(), torch.full((3, 3), 1 / 3))


# -- against the layers' torch code ------------------------------------------------------------------------------------


@pytest.fixture
def glue_path(monkeypatch: pytest.MonkeyPatch):
    """`use(fused)`: the layers take the fused kernels (True) or their torch code (False) on any device."""

    def use(fused: bool) -> None:
        monkeypatch.setattr(glue_selector, "fused_glue", lambda t: glue if fused else None)

    return use


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.cpu().double(), ref.cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


# ||fused - torch|| / ||torch||: fp32 sums in another order; bf16 one rounding (2^-8) here and there.
LAYER_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 9])
def test_fused_glue_equals_the_layers_torch_code(tokens: int, dtype: torch.dtype, device: torch.device,
                                                 glue_path) -> None:
    """RMSNorm (alone and after a residual add), rotary and the MoE block's router at the `mini` shape, each through
    its layer with the torch code and with the fused kernels. The router's gate passes x's first E columns through
    unchanged, so its logits have no ties."""
    c = SHAPES["mini"]
    d, e = c.hidden_size, c.num_experts
    g = _gen(tokens)
    norm = RMSNorm(d, EPS).to(device, dtype)
    moe = MoELayer(d, e, c.experts_per_token, layer=0).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(d, generator=g))
        moe.gate.weight.copy_(torch.eye(e, d))  # [E, D]
    rotary = RotaryEmbedding(c.head_dim, c.rope_theta)
    x, res = (torch.randn(tokens, d, generator=g).to(device, dtype) for _ in range(2))
    q = torch.randn(tokens, c.num_heads, c.head_dim, generator=g).to(device, dtype)
    k = torch.randn(tokens, c.num_kv_heads, c.head_dim, generator=g).to(device, dtype)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(device)
    router_x = torch.zeros(tokens, d, dtype=dtype, device=device)
    router_x[:, :e] = _distinct_logits(tokens, e, dtype, g).to(device)

    outs = {}
    for fused in (False, True):
        glue_path(fused)
        with torch.inference_mode():
            outs[fused] = (norm(x), *norm.add_forward(x, res), *rotary(positions, q.clone(), k.clone()),
                           *moe.route(router_x))
    names = ("norm", "add+norm y", "add+norm r", "rotary q", "rotary k", "router weights", "router ids")
    for name, got, want in zip(names, outs[True], outs[False], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert _rel_err(got, want) < LAYER_TOL[dtype], (name, _rel_err(got, want))
    assert torch.equal(outs[True][-1], outs[False][-1])  # the router's ids


# Experts chosen differently, summed over layers and experts: fp32 none; bf16 may flip a near tie.
COUNT_SLACK = {"fp32": 0, "bf16": 4}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_model_with_fused_glue_matches_its_torch_path(tiny_dir, dtype: str, device: torch.device,
                                                          glue_path) -> None:
    """The tiny model (fused residual adds in every norm, fused rotary and router) gives its torch path's hidden
    states, a prefill then a decode step, and counts the same routing into the forward's expert load."""
    from cluster.model.forward_context import ForwardContext, forward_context
    from cluster.model.kv_cache import ContiguousKVCache
    from cluster.model.loader import load_model
    from cluster.moe.load import ExpertLoad

    lm = load_model(tiny_dir, dtype, device=device).model
    c = lm.config
    tokens = torch.randint(0, c.vocab_size, (13,), generator=_gen(0)).to(device)
    hidden, counts = {}, {}
    for fused in (False, True):
        glue_path(fused)
        cache = ContiguousKVCache(c.num_layers, 2, 32, c.num_kv_heads, c.head_dim, dtype=lm.lm_head.weight.dtype,
                                  device=device)
        load = ExpertLoad.for_model(c, device, rows=13)
        outs = []
        for slots, new, ids in (([0, 1], [7, 6], tokens), ([0, 1], [1, 1], tokens[:2])):
            step = load.step(len(ids))
            step.lay_out(torch.arange(len(ids), device=device))  # every row a real token
            with forward_context(ForwardContext(step)):
                outs.append(lm(ids, cache.begin_step(slots, new), cache))
        hidden[fused], counts[fused] = outs, load.counts.cpu()
    tol = {"fp32": 1e-5, "bf16": 3e-2}[dtype]  # whole layers: attention and experts amplify the glue's roundings
    for got, want in zip(hidden[True], hidden[False], strict=True):
        assert _rel_err(got, want) < tol, _rel_err(got, want)
    assert counts[True].sum() == 15 * c.num_layers * c.experts_per_token  # every token of both steps, K each
    assert (counts[True] - counts[False]).abs().sum() <= COUNT_SLACK[dtype], (counts[True], counts[False])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the split runs on CPU tensors (on a GPU, test_cuda_graphs "
                                                      "runs it there, on the fused path)")
def test_a_piecewise_decode_with_fused_glue_equals_its_forward_bit_for_bit(tiny_dir, glue_path) -> None:
    """The decode step split at its experts carries (x, residual) through the crossing buffers and adds them in
    the next layer's fused norm: the same launches as the whole forward, so the same logits, bit for bit."""
    from cluster.model.loader import load_model
    from tests.test_cuda_graphs import _check_pieces_equal_forward, _cpu_runner, _prefilled, _sharded_experts

    glue_path(True)
    lm = load_model(tiny_dir, "fp32", "cpu")
    with _sharded_experts(tiny_dir, "in-process") as executor:
        lm.model.attach_experts(executor)
        runner = _cpu_runner(lm.model, lm.config)
        pieces, _ = _check_pieces_equal_forward(runner, _prefilled(runner, lm.config.vocab_size))
    assert [c.layer for c in pieces.crossings] == list(range(lm.config.num_layers))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_on_cpu_the_model_is_its_layers_forward_bit_for_bit(tiny_dir, dtype: str) -> None:
    """The selector keeps CPU tensors on the torch code, and the forward that carries (x, residual) between layers
    computes exactly the stream of `DecoderLayer.forward` after `DecoderLayer.forward`."""
    from cluster.model.kv_cache import ContiguousKVCache
    from cluster.model.loader import load_model

    assert glue_selector.fused_glue(torch.zeros(2, 3)) is None
    lm = load_model(tiny_dir, dtype).model
    c = lm.config
    tokens = torch.randint(0, c.vocab_size, (9,), generator=_gen(1))

    def layer_by_layer(ids: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        x = lm.model.embed_tokens(ids)
        for layer in lm.model.layers:
            x = layer(x, positions, cache)
        return lm.model.norm(x)

    outs = []
    for forward in (lm, layer_by_layer):
        cache = ContiguousKVCache(c.num_layers, 1, 16, c.num_kv_heads, c.head_dim, dtype=lm.lm_head.weight.dtype)
        with torch.inference_mode():
            outs.append(forward(tokens, cache.begin_step([0], [9]), cache))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.e2e  # the benchmark's own interpreter
def test_the_benchmark_dry_run_checks_and_times_every_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/glue_kernels.py --dry-run: every op at every T of its dry plan checked against torch and timed
    (interpreter times; no bandwidth claimed)."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    path = benchmarks / "glue_kernels.py"
    monkeypatch.syspath_prepend(str(benchmarks))  # the benchmarks import each other by their bare names
    bench = importlib.import_module("glue_kernels")  # defines no kernel: the benchmark imports them when it runs
    out = tmp_path / "glue.json"
    proc = subprocess.run([sys.executable, str(path), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    ops = {"add_rms_norm", "rms_norm", "rotary", "route"}
    assert sorted((r["op"], r["tokens"]) for r in rows) == sorted((op, t) for op in ops for t in bench.DRY.tokens)
    assert all(r["rel_err"] < bench.CHECK_TOL and r["fused_us"] > 0 and r["torch_us"] > 0 and r["bytes"] > 0
               and r["fraction"] is None for r in rows), rows
    assert result["copy_gbps"] is None and "dry run" in result["headline"]
