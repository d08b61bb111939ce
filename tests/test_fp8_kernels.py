"""FP8 experts in the kernels and backends: the row quantization, the weight type, and the torch backend and the
Triton kernels (W8A16 and W8A8; compiled on a GPU, the interpreter on CPU) against a float64 reference of the
dequantized math on fresh inputs.

Legend: T = tokens, K = experts per token, D = hidden, F = ffn, E = experts, C = padded capacity.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from cluster.kernels import tuning  # noqa: E402
from cluster.kernels.align import align_pairs  # noqa: E402
from cluster.kernels.fp8 import FP8, FP8_MAX, dequantize, fp8_matrix_bytes, quantize_rows  # noqa: E402
from cluster.kernels.fused_moe import down, fused_experts, quantize_activations  # noqa: E402
from cluster.moe.torch_backend import TorchMoEBackend  # noqa: E402
from cluster.moe.triton_backend import TritonMoEBackend, fp8_dot_supported  # noqa: E402
from cluster.moe.weights import ExpertWeights, Fp8Scales, _expert_map  # noqa: E402
from tests.test_kernels import MASK_SHAPES, MASK_TILES, mask_flags, route  # noqa: E402

SEEDS = [0, 1, 2]
# ||out - ref|| / ||ref|| against the dequantized math: fp32 sums in another order; bf16 also rounds x, the
# [P, F] intermediate and the output (as the bf16 kernels' own tests allow).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def fp8_layer(held: list[int], d: int, f: int, dtype: torch.dtype, device: torch.device,
              g: torch.Generator) -> ExpertWeights:
    """Random experts quantized per output channel; `dtype` the compute dtype. Rows of different magnitudes, so
    that a scale that is not each row's own shows."""
    w13 = torch.randn(len(held), 2 * f, d, generator=g) / d**0.5 * torch.rand(len(held), 2 * f, 1, generator=g) * 2
    w2 = torch.randn(len(held), d, f, generator=g) / f**0.5 * torch.rand(len(held), d, 1, generator=g) * 2
    (q13, s13), (q2, s2) = quantize_rows(w13), quantize_rows(w2)
    return ExpertWeights(q13.to(device), q2.to(device), tuple(held), Fp8Scales(s13.to(device), s2.to(device), dtype))


def _rows(v: torch.Tensor) -> torch.Tensor:
    """float64 of `v` [N, K] after the per-row FP8 round trip (what W8A8 does to activations)."""
    q, s = quantize_rows(v)
    return dequantize(q, s, torch.float64)


def reference(x: torch.Tensor, w: ExpertWeights, ids: torch.Tensor, tw: torch.Tensor,
              fp8_activations: bool = False) -> torch.Tensor:
    """float64 on CPU, per token: sum_k w_k * W2_e (silu(W1_e x) * W3_e x) with the dequantized weights; for W8A8
    x goes through the FP8 round trip per token, and h per row after rounding to the compute dtype."""
    x, ids, tw = x.cpu(), ids.cpu(), tw.cpu()
    w13 = dequantize(w.w13.cpu(), w.scales.w13.cpu(), torch.float64)
    w2 = dequantize(w.w2.cpu(), w.scales.w2.cpu(), torch.float64)
    f = w2.shape[2]
    xs = _rows(x.float()) if fp8_activations else x.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e not in w.expert_ids:
                continue
            i = w.expert_ids.index(e)
            h = F.silu(w13[i, :f] @ xs[t]) * (w13[i, f:] @ xs[t])
            if fp8_activations:
                h = _rows(h.to(x.dtype).float().unsqueeze(0))[0]
            out[t] += float(tw[t, k]) * (w2[i] @ h)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# --- the numbers ------------------------------------------------------------------------------------------------------

def test_quantize_rows_scales_each_row_to_its_own_range() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 64, generator=g) * torch.logspace(-3, 2, 40).view(1, 40, 1)  # rows over 5 decades
    w[1, 7] = 0.0  # an all-zero row
    q, s = quantize_rows(w)
    assert q.dtype == FP8 and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (3, 40)
    assert torch.equal(s, (w.abs().amax(-1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny))
    assert (q.float().abs().amax(-1)[w.abs().amax(-1) > 0] == FP8_MAX).all()  # each row's largest maps to 448
    assert (q[1, 7].float() == 0).all()
    back = dequantize(q, s, torch.float64)
    # e4m3 keeps 3 mantissa bits: within half a step (2^-4) relative, above the subnormals (2^-6 of 448)
    normal = w.abs() >= s.unsqueeze(-1) * 2**-6
    err = ((back - w.double()).abs() / w.double().abs())[normal]
    assert err.max() <= 2**-4 + 1e-12, err.max()


def test_quantize_activations_equals_the_reference(device: torch.device) -> None:
    """On a GPU the activations' quantization is a Triton kernel of its own: bit for bit torch's (division rounded
    to nearest, as torch divides). Under the interpreter it is torch's itself (see `quantize_activations`)."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(37, 1500, generator=g) * torch.logspace(-4, 3, 37).view(37, 1)).to(dtype)  # K > BLOCK
        x[5] = 0
        q, s = quantize_activations(x.to(device))
        rq, rs = quantize_rows(x)
        assert torch.equal(s.cpu(), rs), dtype
        assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)), dtype


def test_the_weight_type_checks_what_it_holds() -> None:
    q13, s13 = quantize_rows(torch.randn(2, 8, 4))
    q2, s2 = quantize_rows(torch.randn(2, 4, 4))
    w = ExpertWeights(q13, q2, (0, 1), Fp8Scales(s13, s2, torch.bfloat16))
    assert w.dtype == torch.bfloat16 and w.nbytes == 2 * 8 * 4 + 2 * 4 * 4 + 4 * (2 * 8 + 2 * 4)
    assert fp8_matrix_bytes((8, 4)) == 8 * 4 + 8 * 4
    with pytest.raises(ValueError, match="need scales"):
        ExpertWeights(q13, q2, (0, 1))
    with pytest.raises(ValueError, match="need scales"):
        ExpertWeights(q13.float(), q2.float(), (0, 1), Fp8Scales(s13, s2, torch.float32))
    with pytest.raises(ValueError, match="one per output channel"):
        ExpertWeights(q13, q2, (0, 1), Fp8Scales(s13[:, :4], s2, torch.float32))


def test_w8a8_only_where_the_gpu_multiplies_fp8() -> None:
    assert not fp8_dot_supported(torch.device("cpu"))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert fp8_dot_supported(torch.device("cuda")) == ((major, minor) >= (8, 9))


# --- the backends against the dequantized math ------------------------------------------------------------------------

CASES = {
    # name: (T, K, D, F, held experts of 8, routing restricted to, skew)
    "uneven": (45, 2, 96, 160, list(range(8)), None, 0.6),
    "single_token": (1, 2, 128, 256, list(range(8)), None, 0.0),
    "subset_shard": (33, 2, 64, 224, [1, 4, 6], None, 0.2),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t, held, dtype", [
    (21, [1, 4, 6], torch.float32),  # few rows per expert: the batched path
    (300, [1, 4, 6], torch.float32),  # the per-expert path
    (150, list(range(8)), torch.bfloat16),
])
def test_torch_backend_dequantizes(t: int, held: list[int], dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = fp8_layer(held, 64, 96, dtype, torch.device("cpu"), g)
    x = torch.randn(t, 64, generator=g).to(dtype)
    ids, tw = route(t, 2, 8, g, skew=0.3)
    run = TorchMoEBackend()
    out = run(x, run.prepare(w), ids, tw, 8)
    assert out.dtype == dtype
    err = rel_err(out, reference(x, w, ids, tw))
    assert err < TOL[dtype], f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fp8_activations", [False, True], ids=["w8a16", "w8a8"])
def test_triton_fp8(case: str, dtype: torch.dtype, fp8_activations: bool, seed: int, device: torch.device) -> None:
    """The backend with each FP8 mode asked for explicitly (the interpreter multiplies FP8 operands in fp32, so W8A8
    runs here too; on a GPU before sm_89 the FP8 dot itself would not compile)."""
    if fp8_activations and device.type == "cuda" and not fp8_dot_supported(device):
        pytest.skip("this GPU has no FP8 dot (compute capability < 8.9): W8A8 does not run here")
    t, k, d, f, held, allowed, skew = CASES[case]
    g = torch.Generator().manual_seed(seed)
    w = fp8_layer(held, d, f, dtype, device, g)
    # non-contiguous rows, of magnitudes over 1.5 decades (so that a token scaled by another's scale shows)
    x = (torch.randn(t, d + 16, generator=g) * torch.logspace(-1, 0.5, t).view(t, 1)).to(device, dtype)[:, 8:8 + d]
    ids, tw = route(t, k, 8, g, allowed, skew)
    run = TritonMoEBackend(fp8_activations=fp8_activations)
    out = run(x, run.prepare(w), ids.to(device), tw.to(device), 8)
    assert out.shape == (t, d) and out.dtype == dtype
    err = rel_err(out, reference(x, w, ids, tw, fp8_activations))
    # bf16 W8A8: the kernel's h (an fp32 accumulator rounded to bf16; truncated under the interpreter) and the
    # reference's (float64, rounded) can differ by a bf16 step, and an element that does lands a whole FP8 step
    # (2^-3 relative) away after quantization
    tol = 4 * TOL[dtype] if fp8_activations and dtype == torch.bfloat16 else TOL[dtype]
    assert err < tol, f"{case} seed {seed}: rel err {err} >= {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d, f", MASK_SHAPES)
@pytest.mark.parametrize("fp8_activations", [False, True], ids=["w8a16", "w8a8"])
def test_fp8_on_every_mask_path(d: int, f: int, fp8_activations: bool, dtype: torch.dtype,
                                device: torch.device) -> None:
    """FP8 weights through both kernels under the test tiles whose shapes reach every (EVEN_K, EVEN_N) of each
    kernel (tests/test_kernels.py), fresh inputs per case, against the dequantized float64 reference."""
    if fp8_activations and device.type == "cuda" and not fp8_dot_supported(device):
        pytest.skip("this GPU has no FP8 dot (compute capability < 8.9): W8A8 does not run here")
    t, k, held = 29, 2, [1, 2, 4, 7]
    g = torch.Generator().manual_seed(d * 1000 + f + 7 * fp8_activations)
    w = fp8_layer(held, d, f, dtype, device, g)
    x = (torch.randn(t, d, generator=g) * torch.logspace(-1, 0.5, t).view(t, 1)).to(device, dtype)
    ids, tw = route(t, k, 8, g, skew=0.4)
    aligned = align_pairs(ids.to(device), w.expert_map(8), len(held), MASK_TILES.block_m)
    out = fused_experts(x, w.w13, w.w2, tw.to(device), aligned, MASK_TILES, w.scales.w13, w.scales.w2,
                        fp8_activations=fp8_activations)
    err = rel_err(out, reference(x, w, ids, tw, fp8_activations))
    tol = 4 * TOL[dtype] if fp8_activations and dtype != torch.float32 else TOL[dtype]  # see test_triton_fp8
    assert err < tol, f"D={d} F={f} flags {mask_flags(d, f, MASK_TILES)}: rel err {err} >= {tol}"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the unscaled gate: the interpreter's sigmoid
@pytest.mark.parametrize("fp8_activations", [False, True], ids=["w8a16", "w8a8"])
def test_triton_fp8_without_the_scales_is_wrong(fp8_activations: bool, device: torch.device) -> None:
    """The reference is sensitive to what the test checks: the same FP8 values with the scales dropped (all 1)
    are far from it."""
    if fp8_activations and device.type == "cuda" and not fp8_dot_supported(device):
        pytest.skip("this GPU has no FP8 dot (compute capability < 8.9): W8A8 does not run here")
    g = torch.Generator().manual_seed(3)
    w = fp8_layer(list(range(8)), 64, 96, torch.float32, device, g)
    x = torch.randn(20, 64, generator=g).to(device)
    ids, tw = route(20, 2, 8, g)
    ids, tw = ids.to(device), tw.to(device)
    cfg = tuning.get_config(20, 8, 96, device, torch.float32, fp8_weights=True)
    aligned = align_pairs(ids, w.expert_map(8), 8, cfg.block_m)
    ones = (torch.ones_like(w.scales.w13), torch.ones_like(w.scales.w2))
    out = fused_experts(x, w.w13, w.w2, tw, aligned, cfg, *ones, fp8_activations=fp8_activations)
    assert rel_err(out, reference(x, w, ids, tw, fp8_activations)) > 10


def test_the_kernels_widen_every_fp8_value_exactly(device: torch.device) -> None:
    """W8A16 widens FP8 bytes with integer ops: through the down kernel with one-hot rows of h and unit scales, y
    reads back every finite e4m3 value (normals, subnormals, both zeros) as it is."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8)
    values = values[~values.float().isnan()]  # 254 finite values (0x7F and 0xFF are NaN)
    d, f = values.numel(), 32
    w2 = torch.zeros(1, d, f, dtype=FP8)  # [1, D, F]: column 0 holds every value
    w2[0, :, 0] = values
    h = torch.zeros(32, f)  # [C, F]: slot 0 is the one-hot row
    h[0, 0] = 1.0
    cfg = tuning.KernelConfig(32, 64, 32, 1)
    ids = torch.zeros(1, 1, dtype=torch.int64, device=device)
    aligned = align_pairs(ids, _expert_map((0,), 1, device), 1, cfg.BLOCK_M)
    y = torch.zeros(1, d, device=device)
    down(h.to(device), w2.to(device), y, torch.ones(1, 1, device=device), aligned, cfg,
         w_scale=torch.ones(1, d, device=device))
    assert torch.equal(y[0].cpu(), values.float()), (y[0].cpu() - values.float()).abs().max()


def test_warm_up_runs_fp8_layers_in_their_compute_dtype(device: torch.device) -> None:
    g = torch.Generator().manual_seed(5)
    w = fp8_layer([0, 3, 5], 64, 96, torch.bfloat16, device, g)
    run = TritonMoEBackend()
    ran = run.warm_up(run.prepare(w), max_tokens=40, top_k=2, num_experts=8)
    buckets = tuning.config_buckets(40, 3, 96, device, torch.bfloat16, fp8_weights=True)
    assert [cfg for _, cfg in ran] == list(dict.fromkeys(cfg for _, _, cfg in buckets))


def test_fp8_launches_are_checked(device: torch.device) -> None:
    g = torch.Generator().manual_seed(4)
    w = fp8_layer([0, 1], 64, 96, torch.float32, device, g)
    x = torch.randn(4, 64, generator=g).to(device)
    ids, tw = route(4, 2, 2, g)
    cfg = tuning.get_config(4, 2, 96, device, torch.float32, fp8_weights=True)
    aligned = align_pairs(ids.to(device), w.expert_map(2), 2, cfg.block_m)
    with pytest.raises(ValueError, match="must share a dtype"):
        fused_experts(x, w.w13, w.w2, tw.to(device), aligned, cfg)  # FP8 weights without their scales
    with pytest.raises(ValueError, match="one per output channel"):
        fused_experts(x, w.w13, w.w2, tw.to(device), aligned, cfg, w.scales.w13[:, :5], w.scales.w2)
    with pytest.raises(ValueError, match="FP8 activations need FP8 weights"):
        fused_experts(x, w.w13.float(), w.w2.float(), tw.to(device), aligned, cfg, fp8_activations=True)
