"""The C expert kernel for x86 CPUs against the torch backend, on the routings a server meets."""

import shutil

import pytest
import torch

from cluster.kernels.cpu_build import cpu_kernel_library, cpu_supports_kernels
from cluster.moe.backend import TorchMoEBackend, get_backend
from cluster.moe.weights import ExpertWeights

pytestmark = pytest.mark.skipif(not cpu_supports_kernels() or shutil.which("gcc") is None,
                                reason="needs an x86 CPU with AVX2 and FMA, and gcc")


def _layer(experts: tuple[int, ...], d: int = 64, f: int = 128, seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    e = len(experts)
    return ExpertWeights(torch.randn(e, 2 * f, d, generator=g) * 0.1, torch.randn(e, d, f, generator=g) * 0.1,
                         experts)


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
    from cluster.moe.cpu_backend import CpuMoEBackend

    weights = _layer(experts, seed=tokens)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1))
    ids, topk_weights = _routing(tokens, skew, seed=2)
    kernel = CpuMoEBackend()
    got = kernel(x, weights, ids, topk_weights, 8)
    want = TorchMoEBackend()(x, weights, ids, topk_weights, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # called again (weights packed once, scratch reused, output not accumulated across calls)
    torch.testing.assert_close(kernel(x, weights, ids, topk_weights, 8), want, rtol=1e-5, atol=1e-5)


def test_a_layer_whose_weights_change_is_packed_again():
    from cluster.moe.cpu_backend import CpuMoEBackend

    kernel, x = CpuMoEBackend(), torch.randn(9, 64)
    ids, topk_weights = _routing(9, 0.0, seed=3)
    for seed in (0, 1):
        weights = _layer(tuple(range(8)), seed=seed)
        want = TorchMoEBackend()(x, weights, ids, topk_weights, 8)
        torch.testing.assert_close(kernel(x, weights, ids, topk_weights, 8), want, rtol=1e-5, atol=1e-5)


def test_dtypes_and_shapes_the_kernel_does_not_take_go_to_torch():
    from cluster.moe.cpu_backend import CpuMoEBackend

    ids, topk_weights = _routing(5, 0.0, seed=4)
    bf16 = _layer(tuple(range(8)))
    bf16 = ExpertWeights(bf16.w13.bfloat16(), bf16.w2.bfloat16(), bf16.expert_ids)
    x = torch.randn(5, 64).bfloat16()
    torch.testing.assert_close(CpuMoEBackend()(x, bf16, ids, topk_weights, 8),
                               TorchMoEBackend()(x, bf16, ids, topk_weights, 8))
    odd = _layer(tuple(range(8)), d=40, f=24)  # not multiples of the 16-column panel
    x = torch.randn(5, 40)
    torch.testing.assert_close(CpuMoEBackend()(x, odd, ids, topk_weights, 8),
                               TorchMoEBackend()(x, odd, ids, topk_weights, 8))


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
    base = kernel(x, weights, ids, topk_weights, 8, out_dtype=torch.float32)
    scaled = kernel(x, weights, ids, topk_weights * (1 + 2**-10), 8, out_dtype=torch.float32)
    torch.testing.assert_close(scaled, base * (1 + 2**-10), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(base, TorchMoEBackend()(x, weights, ids, topk_weights, 8, out_dtype=torch.float32),
                               rtol=1e-5, atol=1e-5)
