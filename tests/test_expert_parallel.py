"""Expert parallelism in one process: split by shard, run, combine; exactly what the unsplit layer computes."""

import pytest
import torch

from cluster.config import ModelConfig
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.model.loader import load_model
from cluster.moe.executor import LocalExpertExecutor
from cluster.moe.torch_backend import TorchMoEBackend
from cluster.moe.weights import ExpertWeights
from cluster.parallel.dispatch import ExpertParallelExecutor
from cluster.parallel.in_process import InProcessTransport
from cluster.parallel.placement import assign_experts, expert_owners
from cluster.parallel.shard_worker import ShardWorker
from cluster.serve.args import ServeArgs
from cluster.serve.engine_builder import build_engine, in_process_executor
from cluster.serve.resolved import resolve
from cluster.tokenizer import load_tokenizer

E, D, F, K, LAYERS = 8, 64, 96, 2, 3


def _layers(dtype: torch.dtype, experts: tuple[int, ...] = tuple(range(E)), seed: int = 0) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        w13 = torch.randn(E, 2 * F, D, generator=g) / D**0.5
        w2 = torch.randn(E, D, F, generator=g) / F**0.5
        idx = list(experts)
        out.append(ExpertWeights(w13[idx].to(dtype), w2[idx].to(dtype), experts))
    return out


def _routing(tokens: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).to(torch.int32)  # [T, K]
    w = torch.softmax(torch.randn(tokens, K, generator=g), -1).to(dtype)
    return x, ids, w


def _backend(per_expert_only: bool) -> TorchMoEBackend:
    backend = TorchMoEBackend()
    if per_expert_only:  # the same matmul per expert whatever the shard holds: results must match bit for bit
        backend.batched_max_rows = 0
    return backend


def _sharded(dtype: torch.dtype, shards: int, per_expert_only: bool = False,
             broadcast_rows: int = 64) -> ExpertParallelExecutor:
    groups = assign_experts(E, shards)
    workers = [ShardWorker(_layers(dtype, g), E, _backend(per_expert_only)) for g in groups]
    return ExpertParallelExecutor(InProcessTransport(workers), expert_owners(groups), broadcast_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("tokens", [1, 5, 32, 200])
@pytest.mark.parametrize("broadcast_rows", [0, 64], ids=["split", "broadcast-small"])
def test_sharded_layer_equals_unsplit_layer(dtype, shards, tokens, broadcast_rows):
    """Bit for bit when each expert runs the same matmul; within rounding when a shard picks the batched path."""
    for exact in (True, False):
        whole = LocalExpertExecutor(_layers(dtype), E, _backend(exact))
        split = _sharded(dtype, shards, exact, broadcast_rows)
        for layer in range(LAYERS):
            x, ids, w = _routing(tokens, dtype, seed=layer * 100 + tokens)
            expected = whole(layer, x, ids, w)
            got = split(layer, x, ids, w)
            assert got.dtype == dtype and got.shape == (tokens, D)
            if exact:
                assert torch.equal(got, expected), (layer, (got.float() - expected.float()).abs().max())
            else:
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_split_batches_send_a_shard_only_its_tokens_and_small_ones_go_whole_to_all():
    split = _sharded(torch.float32, 4, broadcast_rows=5)
    sent = []
    run = split.transport.run
    split.transport.run = lambda batches: sent.append(batches) or run(batches)
    x, _, w = _routing(6, torch.float32, seed=1)
    ids = torch.tensor([[0, 1]] * 3 + [[0, 7]] * 3, dtype=torch.int32)  # shards 0 and 3 only
    split(0, x, ids, w)
    rows = [None if b is None else b.x.shape[0] for b in sent[0]]
    assert rows == [6, None, None, 3]
    split(0, x[:5], ids[:5], w[:5])
    assert [b.x.shape[0] for b in sent[1]] == [5, 5, 5, 5]


def test_shard_worker_loads_only_its_experts(tiny_dir):
    worker = ShardWorker.load(tiny_dir, ModelConfig.from_file(tiny_dir), (2, 5), torch.float32, "cpu")
    whole = load_model(tiny_dir, "fp32").model.model.layers[1].block_sparse_moe.executor.layers[1]
    assert worker.expert_ids == (2, 5) and len(worker.layers) == 2
    assert torch.equal(worker.layers[1].w13, whole.w13[[2, 5]])
    assert torch.equal(worker.layers[1].w2, whole.w2[[2, 5]])


def _drive(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    """Half the requests first, the rest mid-flight; every request's tokens."""
    half = len(prompts) // 2
    for i, p in enumerate(prompts[:half]):
        engine.add_request(str(i), p, params)
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        steps += 1
        if steps == 2:
            for i, p in enumerate(prompts[half:], start=half):
                engine.add_request(str(i), p, params)
    return tokens


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                                    SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_in_process_shards_generate_what_one_executor_generates(tiny_dir, shards, params):
    tok = load_tokenizer("v3")
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 60, (10,), generator=g)
    prompts = [torch.randint(3, 32768, (int(n),), generator=g).tolist() for n in lengths]
    single = LLMEngine(load_model(tiny_dir, "fp32").model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=2**24))
    args = resolve(ServeArgs(model=str(tiny_dir), shards=shards, device="cpu", dtype="fp32", kv_cache_bytes=2**24))
    sharded = build_engine(args, in_process_executor(args))
    expected = _drive(single, prompts, params)
    assert len(expected) == 10 and all(len(t) == 20 for t in expected.values())
    assert _drive(sharded, prompts, params) == expected
