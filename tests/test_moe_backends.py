"""The MoE backend contract as its holders use it: the executor and the shard worker prepare each layer once, keep
the backend's layout, and hand that (never the raw weights) to every call and to warm-up."""

from __future__ import annotations

import pytest
import torch

from cluster.config import ModelConfig
from cluster.moe.backend import MoEBackend, get_backend
from cluster.moe.executor import LocalExpertExecutor
from cluster.moe.torch_backend import TorchMoEBackend
from cluster.moe.weights import ExpertWeights
from cluster.parallel.dispatch import RoutedBatch
from cluster.parallel.shard_worker import ShardWorker

E, D, F = 4, 32, 48  # experts, hidden, ffn


def _layer(seed: int, f: int = F) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights(torch.randn(E, 2 * f, D, generator=g), torch.randn(E, D, f, generator=g), tuple(range(E)))


class _Layout:
    """A layout that is not the weights: a holder that passed the raw weights would be caught."""

    def __init__(self, weights: ExpertWeights):
        self.weights = weights


class _Recording:
    """A backend that records what it is handed."""

    name = "recording"

    def __init__(self, graph_safe: bool):
        self.graph_safe = graph_safe
        self.prepared: list[ExpertWeights] = []
        self.calls: list[tuple[_Layout, torch.dtype | None]] = []
        self.warmed: list[tuple[_Layout, int, int, int]] = []

    def supports(self, weights: ExpertWeights) -> bool:
        return True

    def prepare(self, weights: ExpertWeights) -> _Layout:
        self.prepared.append(weights)
        return _Layout(weights)

    def __call__(self, x: torch.Tensor, prepared: _Layout, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        assert isinstance(prepared, _Layout), f"called with {type(prepared).__name__}, not the prepared layout"
        self.calls.append((prepared, out_dtype))
        return torch.zeros(x.shape, dtype=out_dtype or x.dtype)

    def warm_up(self, prepared: _Layout, max_tokens: int, top_k: int, num_experts: int) -> None:
        assert isinstance(prepared, _Layout), f"warmed with {type(prepared).__name__}, not the prepared layout"
        self.warmed.append((prepared, max_tokens, top_k, num_experts))


def _batch(layer: int, tokens: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(layer)
    return (torch.randn(tokens, D, generator=g), torch.randint(0, E, (tokens, 2), generator=g, dtype=torch.int32),
            torch.rand(tokens, 2, generator=g))


@pytest.mark.parametrize("graph_safe", [False, True])
def test_the_executor_holds_each_layers_layout(graph_safe: bool):
    layers = [_layer(0), _layer(1), _layer(2, f=64)]
    backend = _Recording(graph_safe)
    executor = LocalExpertExecutor(layers, E, backend)
    assert backend.prepared == layers  # each layer once, at construction
    for i in (2, 0, 1, 0):
        executor(i, *_batch(i))
    assert [layout.weights for layout, _ in backend.calls] == [layers[i] for i in (2, 0, 1, 0)]
    assert [layout for layout, _ in backend.calls] == [executor.prepared[i] for i in (2, 0, 1, 0)]
    assert executor.graph_safe is graph_safe
    executor.warm_up(max_tokens=24, top_k=2)
    # layers 0 and 1 share shape, dtype, device and experts: one warm-up covers both
    assert backend.warmed == [(executor.prepared[0], 24, 2, E), (executor.prepared[2], 24, 2, E)]
    assert len(backend.prepared) == 3  # neither a call nor warm-up prepared again


def test_the_shard_worker_holds_each_layers_layout():
    layers = [_layer(0), _layer(1)]
    backend = _Recording(graph_safe=False)
    worker = ShardWorker(layers, E, backend)
    assert backend.prepared == layers
    out = worker.run(RoutedBatch(1, *_batch(1)))
    assert out.dtype == torch.float32 and backend.calls == [(worker.prepared[1], torch.float32)]
    worker.warm_up(max_tokens=8, top_k=2)
    assert backend.warmed == [(worker.prepared[0], 8, 2, E)]
    assert len(backend.prepared) == 2


def test_shard_worker_load_takes_the_config_and_dtype_it_is_given(tiny_dir, monkeypatch):
    config = ModelConfig.from_file(tiny_dir)

    def read_again(*args, **kwargs):
        raise AssertionError("ShardWorker.load read config.json again")

    monkeypatch.setattr(ModelConfig, "from_file", read_again)
    worker = ShardWorker.load(tiny_dir, config, (1, 3), torch.bfloat16, "cpu", "torch")
    assert worker.expert_ids == (1, 3) and worker.num_experts == config.num_experts
    assert len(worker.layers) == config.num_layers and worker.layers[0].w13.dtype == torch.bfloat16
    assert worker.prepared == worker.layers  # the torch backend's layout is the weights themselves


@pytest.mark.parametrize("name, graph_safe", [
    ("torch", False),
    pytest.param("cpu", False, marks=pytest.mark.cpu_kernels),  # conftest's rule for the C kernels
    ("triton", True),
])
def test_every_backend_has_the_whole_contract(name: str, graph_safe: bool, device: torch.device):
    """Each registered backend: its name, graph_safe, supports, prepare, warm_up, and a call on the prepared layer
    that gives the torch backend's result."""
    if name == "triton":
        pytest.importorskip("triton")
    dev = device if name == "triton" else torch.device("cpu")
    backend: MoEBackend = get_backend(name, dev)
    assert backend.name == name and backend.graph_safe is graph_safe
    weights = _layer(0)
    weights = ExpertWeights(weights.w13.to(dev), weights.w2.to(dev), weights.expert_ids)
    assert backend.supports(weights) is True  # fp32, D and F multiples of 16: every backend runs it natively
    prepared = backend.prepare(weights)
    backend.warm_up(prepared, 4, 2, E)
    x, ids, tw = (t.to(dev) for t in _batch(0, tokens=5))
    out = backend(x, prepared, ids, tw, E, out_dtype=torch.float32)
    torch_backend = TorchMoEBackend()
    want = torch_backend(x, torch_backend.prepare(weights), ids, tw, E, out_dtype=torch.float32)
    assert out.shape == (5, D) and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown MoE backend 'cuda'"):
        get_backend("cuda", "cpu")
