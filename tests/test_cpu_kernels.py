"""The C expert kernel for x86 CPUs against the torch backend, on the routings a server meets."""

import pytest
import torch

from cluster.kernels.cpu_build import cpu_kernel_library
from cluster.moe.backend import get_backend
from cluster.moe.torch_backend import TorchMoEBackend
from cluster.moe.weights import ExpertWeights

pytestmark = pytest.mark.cpu_kernels  # the rule in conftest.py: skips only without AVX2/FMA or a compiler outside CI


def _layer(experts: tuple[int, ...], d: int = 64, f: int = 128, seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    e = len(experts)
    return ExpertWeights(torch.randn(e, 2 * f, d, generator=g) * 0.1, torch.randn(e, d, f, generator=g) * 0.1,
                         experts)


def _torch(x: torch.Tensor, weights: ExpertWeights, ids: torch.Tensor, topk_weights: torch.Tensor,
           num_experts: int, **kwargs) -> torch.Tensor:
    backend = TorchMoEBackend()
    return backend(x, backend.prepare(weights), ids, topk_weights, num_experts, **kwargs)


def _reference(x: torch.Tensor, weights: ExpertWeights, ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """float64, from the definition: sum_k w_k * W2_e (silu(W1_e x) * W3_e x) over the experts the layer holds."""
    f = weights.w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, k in torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1])).tolist():
        if int(ids[t, k]) in weights.expert_ids:
            i = weights.expert_ids.index(int(ids[t, k]))
            w13, w2, xt = weights.w13[i].double(), weights.w2[i].double(), x[t].double()
            out[t] += float(topk_weights[t, k]) * (w2 @ (torch.nn.functional.silu(w13[:f] @ xt) * (w13[f:] @ xt)))
    return out


def _routing(tokens: int, skew: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, 8, generator=g) + torch.linspace(0, skew, 8)
    weights, ids = torch.topk(logits.softmax(-1), 2)
    return ids.int(), weights


def test_the_library_builds_here():
    assert cpu_kernel_library() is not None
    assert get_backend("auto", "cpu").name == "cpu"


# 1 token (most experts idle), a decode batch, a skewed mixed step with more rows than one register tile per expert,
# a row count that is no multiple of the 6-row tile, and experts held by another shard (their pairs add nothing).
@pytest.mark.parametrize("tokens, skew, experts", [
    (1, 0.0, tuple(range(8))),
    (64, 0.0, tuple(range(8))),
    (301, 3.0, tuple(range(8))),
    (13, 1.0, (1, 4, 6)),
    (40, 0.0, (7,)),
])
def test_the_kernel_matches_the_torch_backend(tokens, skew, experts):
    from cluster.moe.cpu_backend import CpuMoEBackend, PackedExperts

    weights = _layer(experts, seed=tokens)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1))
    ids, topk_weights = _routing(tokens, skew, seed=2)
    kernel = CpuMoEBackend()
    packed = kernel.prepare(weights)
    assert isinstance(packed, PackedExperts)  # the kernel runs, not the fallback
    got = kernel(x, packed, ids, topk_weights, 8)
    want = _torch(x, weights, ids, topk_weights, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # called again (the packed layer and the scratch reused, output not accumulated across calls)
    torch.testing.assert_close(kernel(x, packed, ids, topk_weights, 8), want, rtol=1e-5, atol=1e-5)


def test_each_prepared_layer_gives_its_own_result_without_repacking(monkeypatch):
    """No cache behind the backend: two weight sets prepared one after the other each give their own float64
    reference result, called in alternation, also by another backend instance; calls never pack again."""
    import cluster.moe.cpu_backend as cpu_backend

    kernel = cpu_backend.CpuMoEBackend()
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    ids, topk_weights = _routing(9, 0.0, seed=3)
    layers = [_layer(tuple(range(8)), seed=seed) for seed in (10, 11)]
    packed = [kernel.prepare(w) for w in layers]
    wants = [_reference(x, w, ids, topk_weights) for w in layers]
    assert (wants[0] - wants[1]).norm() > 0.1 * wants[0].norm()  # two different layers
    packs, pack = [], cpu_backend._pack
    monkeypatch.setattr(cpu_backend, "_pack", lambda w: packs.append(w.shape) or pack(w))
    for run in (kernel, kernel, cpu_backend.CpuMoEBackend()):
        for i in (1, 0):
            err = ((run(x, packed[i], ids, topk_weights, 8).double() - wants[i]).norm() / wants[i].norm()).item()
            assert err < 1e-5, f"layer {i} (seed {10 + i}): rel err {err}"
    assert packs == [], "a call packed the weights again"


def test_dtypes_and_shapes_the_kernel_does_not_take_go_to_torch():
    from cluster.moe.cpu_backend import CpuMoEBackend

    ids, topk_weights = _routing(5, 0.0, seed=4)
    bf16 = _layer(tuple(range(8)))
    bf16 = ExpertWeights(bf16.w13.bfloat16(), bf16.w2.bfloat16(), bf16.expert_ids)
    x = torch.randn(5, 64).bfloat16()
    kernel = CpuMoEBackend()
    assert not kernel.supports(bf16)
    torch.testing.assert_close(kernel(x, kernel.prepare(bf16), ids, topk_weights, 8),
                               _torch(x, bf16, ids, topk_weights, 8))
    odd = _layer(tuple(range(8)), d=40, f=24)  # not multiples of the 16-column panel
    x = torch.randn(5, 40)
    assert not kernel.supports(odd)
    torch.testing.assert_close(kernel(x, kernel.prepare(odd), ids, topk_weights, 8),
                               _torch(x, odd, ids, topk_weights, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_router_weights_are_not_rounded(dtype):
    """fp32 router weights with fp32 (the C kernel) or bf16 (the torch fallback) activations: scaling the weights by
    1 + 2^-10, below bf16's 2^-8 step, scales the fp32 output by exactly that, so no path rounds them to bf16."""
    from cluster.moe.cpu_backend import CpuMoEBackend

    layer = _layer(tuple(range(8)), seed=6)
    weights = ExpertWeights(layer.w13.to(dtype), layer.w2.to(dtype), layer.expert_ids)
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    ids, topk_weights = _routing(12, 1.0, seed=8)
    assert topk_weights.dtype == torch.float32
    kernel = CpuMoEBackend()
    prepared = kernel.prepare(weights)
    base = kernel(x, prepared, ids, topk_weights, 8, out_dtype=torch.float32)
    scaled = kernel(x, prepared, ids, topk_weights * (1 + 2**-10), 8, out_dtype=torch.float32)
    torch.testing.assert_close(scaled, base * (1 + 2**-10), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(base, _torch(x, weights, ids, topk_weights, 8, out_dtype=torch.float32),
                               rtol=1e-5, atol=1e-5)
