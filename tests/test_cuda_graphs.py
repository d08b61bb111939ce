"""Decode steps for CUDA graphs: the piecewise split (pieces between the experts' crossings) computes exactly the
model's own forward over a bucket's padded static buffers, eagerly on any device, with the experts behind the
in-process transport or a real gloo channel; the crossings read the fixed buffers the pieces write. On a GPU the
captured graphs (whole and piecewise) give the eager logits, and an engine replaying piecewise graphs generates the
eager tokens."""

import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch

from cluster.config import ModelConfig
from cluster.engine.cuda_graphs import choose_graphs, crossing_layers
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.model_runner import ModelRunner
from cluster.engine.paged_cache import PagedKVCache
from cluster.engine.piecewise_graphs import CrossingBuffers, DecodePieces, PiecewiseGraphs
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledSeq, SchedulerOutput
from cluster.engine.sequence import Sequence
from cluster.model.loader import load_model
from cluster.moe.load import ExpertLoad
from cluster.parallel.channel import ReplicaChannel, free_port, open_group, serve_shard
from cluster.parallel.dispatch import ExpertParallelExecutor
from cluster.parallel.frames import ChannelSpec
from cluster.parallel.hybrid import HybridTransport
from cluster.parallel.in_process import InProcessTransport
from cluster.parallel.placement import assign_experts, expert_owners
from cluster.parallel.shard_worker import ShardWorker

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
BLOCK, NUM_BLOCKS, BUCKET = 16, 32, 8
PROMPTS = (5, 33, 16)  # the last one decodes into a fresh block


@contextlib.contextmanager
def _sharded_experts(tiny_dir, transport: str, device: str = "cpu", backend: str = "auto"
                     ) -> Iterator[ExpertParallelExecutor]:
    """The tiny model's experts on two shards: both in this process, or shard 1 over gloo (a thread serving it)."""
    config = ModelConfig.from_file(tiny_dir)
    groups = assign_experts(config.num_experts, 2)
    workers = [ShardWorker.load(tiny_dir, config, g, torch.float32, device, backend) for g in groups]
    if transport == "in-process":
        yield ExpertParallelExecutor(InProcessTransport(workers), expert_owners(groups))
        return
    spec = ChannelSpec("127.0.0.1", free_port("127.0.0.1"), 1, config.hidden_size, config.experts_per_token, "fp32",
                       max_rows=48, connect_timeout_s=30)
    ended: list[str] = []
    shard = threading.Thread(target=lambda: ended.append(serve_shard(spec, open_group(spec, 1), workers[1])),
                             daemon=True)
    shard.start()
    channel = HybridTransport({0: workers[0]}, ReplicaChannel(spec), (1,))
    try:
        yield ExpertParallelExecutor(channel, expert_owners(groups))
    finally:
        channel.close()
        shard.join(10)
    assert ended == ["stopped by the replica"], ended


class _Watched:
    """The executor it wraps, unchanged, noting each call's layer and the storage of its inputs."""

    graph_safe = False

    def __init__(self, executor):
        self.executor = executor
        self.calls: list[tuple[int, int, int, int]] = []

    def __call__(self, layer, x, topk_ids, topk_weights):
        self.calls.append((layer, x.data_ptr(), topk_ids.data_ptr(), topk_weights.data_ptr()))
        return self.executor(layer, x, topk_ids, topk_weights)


class _GraphSafe(_Watched):
    """The executor it wraps, declared capturable: its layer must stay inside a piece."""

    graph_safe = True


def _prefilled(runner: ModelRunner, vocab: int, seed: int = 5) -> list[ScheduledSeq]:
    """Sequences of `PROMPTS` lengths prefilled through `runner` (greedy), each scheduled for one decode token."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    seqs = []
    for i, n in enumerate(PROMPTS):
        seq = Sequence(i, f"r{i}", 0, torch.randint(3, vocab, (n,), generator=g).tolist(), SamplingParams())
        seq.block_table = [free.pop() for _ in range(-(-(n + 3) // BLOCK))]  # room for 3 decodes
        seqs.append(seq)
    logits, _ = runner.run(SchedulerOutput([ScheduledSeq(s, s.num_tokens) for s in seqs]))
    _advance(seqs, logits)
    return _decodes(seqs)


def _advance(seqs: list[Sequence], logits: torch.Tensor) -> None:
    for s, token in zip(seqs, logits.argmax(-1).tolist()):
        s.num_computed = s.num_tokens
        s.output.append(token)


def _decodes(seqs: list[Sequence]) -> list[ScheduledSeq]:
    return sorted((ScheduledSeq(s, 1) for s in seqs), key=lambda s: s.seq.num_computed)


def _cpu_runner(model, config) -> ModelRunner:
    return ModelRunner(model, PagedKVCache(config, NUM_BLOCKS, BLOCK, torch.float32, "cpu", backend="torch"))


def _check_pieces_equal_forward(runner: ModelRunner, items: list[ScheduledSeq], steps: int = 2
                                ) -> tuple[DecodePieces, CrossingBuffers]:
    """`steps` decode steps of `items`: the pieces (built once, over a prefix of larger buffers as a capture lays
    them out) give exactly `forward_decode`'s logits each step."""
    config = runner.model.config
    buffers = CrossingBuffers.allocate(2 * BUCKET, config.hidden_size, config.experts_per_token, torch.float32,
                                       runner.device).rows(BUCKET)
    pieces = DecodePieces(runner, runner.prepare_decode([], BUCKET), buffers)
    for step in range(steps):
        unpadded = runner.forward(runner.prepare(items))  # [3, V]
        assert runner.prepare_decode(items, BUCKET) is pieces.inputs  # the static inputs the pieces were built on
        want = runner.forward_decode(BUCKET)  # [BUCKET, V]
        got = pieces.run()
        assert got.shape == want.shape and torch.equal(got, want), (step, (got - want).abs().max())
        torch.testing.assert_close(got[:len(items)], unpadded, rtol=1e-5, atol=1e-5)
        _advance([s.seq for s in items], got[:len(items)])
        items = _decodes([s.seq for s in items])
    return pieces, buffers


@pytest.mark.parametrize("transport", ["in-process", "gloo"])
def test_piecewise_decode_equals_the_forward_bit_for_bit(tiny_dir, transport):
    lm = load_model(tiny_dir, "fp32", "cpu")
    model, config = lm.model, lm.config
    with _sharded_experts(tiny_dir, transport) as executor:
        watched = _Watched(executor)
        model.attach_experts(watched)
        runner = _cpu_runner(model, config)
        items = _prefilled(runner, config.vocab_size)
        watched.calls.clear()
        pieces, buffers = _check_pieces_equal_forward(runner, items)
    layers = config.num_layers
    assert len(pieces.pieces) == layers + 1 and [c.layer for c in pieces.crossings] == list(range(layers))
    # Each step: the unpadded forward, forward_decode, then the pieces, whose crossings read the fixed buffers.
    from_pieces = [c for i, c in enumerate(watched.calls) if i % (3 * layers) >= 2 * layers]
    assert len(watched.calls) == 2 * 3 * layers and [c[0] for c in from_pieces] == [0, 1, 0, 1]
    fixed = (buffers.moe_in.data_ptr(), buffers.topk_ids.data_ptr(), buffers.topk_weights.data_ptr())
    assert all(c[1:] == fixed for c in from_pieces), (from_pieces, fixed)


def test_graph_safe_experts_and_dense_layers_stay_inside_pieces(tiny_dir, tiny_dense_dir):
    lm = load_model(tiny_dir, "fp32", "cpu")
    model, config = lm.model, lm.config
    local = model.model.layers[0].block_sparse_moe.executor
    assert crossing_layers(model) == (0, 1)  # the torch backend syncs with the host
    with _sharded_experts(tiny_dir, "in-process") as sharded:
        model.model.layers[0].block_sparse_moe.executor = _GraphSafe(local)
        model.model.layers[1].block_sparse_moe.executor = sharded
        assert crossing_layers(model) == (1,)
        runner = _cpu_runner(model, config)
        pieces, _ = _check_pieces_equal_forward(runner, _prefilled(runner, config.vocab_size))
        assert len(pieces.pieces) == 2 and [c.layer for c in pieces.crossings] == [1]

    dense = load_model(tiny_dense_dir, "fp32", "cpu")
    assert crossing_layers(dense.model) == ()
    runner = _cpu_runner(dense.model, dense.config)
    pieces, _ = _check_pieces_equal_forward(runner, _prefilled(runner, dense.config.vocab_size), steps=1)
    assert len(pieces.pieces) == 1 and not pieces.crossings


def test_the_pieces_count_the_routing_the_forward_counts(tiny_dir):
    """What a piecewise capture holds: piece 0 lays out the expert count's weights, the later pieces count under the
    same context. Run piece by piece, as a capture runs them, the split counts per expert what `forward_decode`
    counts over the same padded step: K per real token of each layer, the padding rows nothing."""
    lm = load_model(tiny_dir, "fp32", "cpu")
    model, config = lm.model, lm.config
    with _sharded_experts(tiny_dir, "in-process") as executor:
        model.attach_experts(executor)
        load = ExpertLoad.for_model(config, "cpu", rows=64)
        runner = ModelRunner(model, PagedKVCache(config, NUM_BLOCKS, BLOCK, torch.float32, "cpu", backend="torch"),
                             expert_load=load)
        items = _prefilled(runner, config.vocab_size)
        buffers = CrossingBuffers.allocate(BUCKET, config.hidden_size, config.experts_per_token, torch.float32,
                                           runner.device)
        pieces = DecodePieces(runner, runner.prepare_decode([], BUCKET), buffers)
        deltas = []
        for split in (False, True):
            runner.prepare_decode([], BUCKET)
            runner.forward_decode(BUCKET)  # all padding: leaves the bucket's weights all 0 for the next step to redo
            runner.prepare_decode(items, BUCKET)
            before = load.counts.clone()
            if split:
                with torch.inference_mode():
                    for piece, crossing in zip(pieces.pieces, pieces.crossings):
                        piece()
                        crossing()
                    pieces.pieces[-1]()
            else:
                runner.forward_decode(BUCKET)
            deltas.append(load.counts - before)
    whole, split = deltas
    assert whole.sum(dim=1).tolist() == [len(items) * config.experts_per_token] * config.num_layers
    assert torch.equal(split, whole)


def test_the_graphs_import_nothing_of_the_model_runner():
    """The graphs take the runner as their own `DecodeRunner` protocol: no import of its module, not even for types
    (the runner imports the graphs, one way)."""
    import ast
    from pathlib import Path

    import cluster.engine.cuda_graphs as whole
    import cluster.engine.piecewise_graphs as piecewise

    for module in (whole, piecewise):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "cluster.engine" in {name.rpartition(".")[0] for name in imported}, module.__name__  # the walk sees
        assert "cluster.engine.model_runner" not in imported, module.__name__


def test_graphs_are_refused_off_cuda_and_say_why(tiny_dir):
    lm = load_model(tiny_dir, "fp32", "cpu")
    cache = PagedKVCache(lm.config, NUM_BLOCKS, BLOCK, torch.float32, "cpu", backend="triton")
    choice = choose_graphs(lm.model, cache)
    assert choice.kind is None and "CUDA device" in choice.reason


# --- on a GPU -----------------------------------------------------------------------------------------------------

def _graph_launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("cudaGraphLaunch"))


@CUDA
@pytest.mark.parametrize("kind", ["whole", "piecewise"])
def test_captured_decode_graphs_give_the_eager_logits(tiny_dir, kind):
    lm = load_model(tiny_dir, "fp32", "cuda", backend="triton")
    model, config = lm.model, lm.config
    with _sharded_experts(tiny_dir, "in-process", "cuda", "triton") as sharded:
        if kind == "piecewise":
            model.attach_experts(sharded)
        cache = PagedKVCache(config, NUM_BLOCKS, BLOCK, torch.float32, "cuda", backend="triton")
        choice = choose_graphs(model, cache)
        assert choice.kind == kind, choice.reason
        runner = ModelRunner(model, cache, decode_buckets=(1, 2, 4, BUCKET))
        items = _prefilled(runner, config.vocab_size)
        runner.capture_graphs(kind)
        assert isinstance(runner.graphs, PiecewiseGraphs) == (kind == "piecewise")
        bucket = 4  # the 3 decodes, padded
        for step in range(3):
            runner.prepare_decode(items, bucket)
            want = runner.forward_decode(bucket).clone()
            launches = _graph_launches(lambda: runner.graphs.replay(bucket))
            runner.prepare_decode(items, bucket)
            got = runner.graphs.replay(bucket).clone()
            assert launches == (config.num_layers + 1 if kind == "piecewise" else 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            assert torch.equal(got.argmax(-1), want.argmax(-1)), step
            _advance([s.seq for s in items], got[:len(items)])
            items = _decodes([s.seq for s in items])


@CUDA
def test_an_engine_replaying_piecewise_graphs_generates_the_eager_tokens(tiny_dir):
    """The same engine with its decode steps replayed, then run eagerly over the same padded buffers."""
    lm = load_model(tiny_dir, "fp32", "cuda", backend="triton")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [torch.randint(3, lm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 17, 40, 9, 64)]
    tokens = {}
    with _sharded_experts(tiny_dir, "in-process", "cuda", "triton") as sharded:
        lm.model.attach_experts(sharded)
        engine = LLMEngine(lm.model, lambda ids: " ".join(map(str, ids)), 2,
                           EngineConfig(max_num_seqs=8, kv_cache_bytes=2**24, attention_backend="triton",
                                        enable_prefix_caching=False, cuda_graphs=True))
        assert isinstance(engine.runner.graphs, PiecewiseGraphs)
        for graphs in (True, False):
            engine.runner.use_graphs = graphs
            for i, p in enumerate(prompts):
                engine.add_request(f"{graphs}-{i}", p, params)
            out: dict[str, list[int]] = {}
            while engine.has_work():
                for o in engine.step():
                    out.setdefault(o.request_id.split("-")[1], []).extend(o.token_ids)
            tokens[graphs] = out
    assert tokens[True] == tokens[False]
    assert sorted(tokens[True]) == [str(i) for i in range(len(prompts))]
    assert all(len(t) == params.max_tokens for t in tokens[True].values())


def test_capture_refuses_a_kind_the_model_does_not_allow(tiny_dir):
    """Graphs of a step that reads host data or crosses to other processes would replay stale work."""
    lm = load_model(tiny_dir, "fp32", "cpu")
    runner = ModelRunner(lm.model, PagedKVCache(lm.config, NUM_BLOCKS, BLOCK, torch.float32, "cpu",
                                                backend="triton"), decode_buckets=(1,))
    for kind in ("whole", "piecewise"):
        with pytest.raises(ValueError, match="CUDA device"):
            runner.capture_graphs(kind)
