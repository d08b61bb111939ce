"""Decode steps replayed from CUDA graphs, captured once per batch-size bucket at start-up.

A decode step of a Mixtral is a few hundred small kernels per layer; launched one by one from Python, the launches
cost more than an H200 takes to read the weights. The model runner lays a decode batch into static buffers padded
to a bucket (`ModelRunner.prepare_decode`), so the forward over them (`forward_decode`) touches the same device
memory every step: captured once per bucket, the step is replayed instead of launched.

Two kinds (`choose_graphs` picks one and says why):
- whole: every layer's experts are graph-safe (in this process, on a backend that never syncs with the host), so
  the step is one graph (`DecodeGraphs`), one launch.
- piecewise: some layers' experts cannot be captured (shards in other processes behind a channel: NCCL rounds and
  host-side waits), so the step is split at those layers' executor calls, the crossings: C crossings give C + 1
  graphs, and each crossing runs eagerly between two of them (`cluster.engine.piecewise_graphs`).
Attention must be graph-safe for either kind; otherwise decode steps run eagerly.

Capture needs every kernel compiled and every lazily built tensor (rotary frequencies, expert maps) made before
it: each bucket's step runs eagerly on the capture stream first. All graphs of a runner share one memory pool,
largest bucket first, so the smaller ones reuse its activations' memory.

A graph replays exactly what the eager step launches, the step's own layout included: the runner's `begin_step`
(attention's plan, the expert count's weights) runs inside the captured forward, or in a piecewise step's first
piece, under the forward's context (`cluster.model.forward_context`), whose tensors the replays keep using. The graphs
see the runner only as a `DecodeRunner`, defined here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch

if TYPE_CHECKING:
    from cluster.engine.paged_cache import PagedKVCache
    from cluster.engine.scheduler import ScheduledSeq
    from cluster.engine.step_inputs import StepInputs
    from cluster.model.decoder import CausalLM
    from cluster.model.forward_context import ForwardContext
    from cluster.model.moe import MoELayer

log = logging.getLogger(__name__)

GraphKind = Literal["whole", "piecewise"]


class DecodeRunner(Protocol):
    """What the decode graphs need of a model runner (`cluster.engine.model_runner.ModelRunner` is one)."""

    model: CausalLM
    cache: PagedKVCache
    device: torch.device
    decode_buckets: tuple[int, ...]

    def prepare_decode(self, items: list[ScheduledSeq], bucket: int) -> StepInputs:
        """Lay a decode batch into `bucket`'s static inputs (padding rows past `items`) and return them."""
        ...

    def forward_decode(self, bucket: int) -> torch.Tensor:
        """logits [bucket, V] of the step in `bucket`'s static inputs: the whole forward, context and layout."""
        ...

    def step_context(self, inputs: StepInputs) -> ForwardContext:
        """The context a forward over `inputs` runs under (no device work)."""
        ...

    def begin_step(self, inputs: StepInputs, context: ForwardContext) -> None:
        """The step's layout on the device, before the first layer."""
        ...


@dataclass(frozen=True)
class GraphChoice:
    kind: GraphKind | None  # None: decode steps run eagerly
    reason: str


def crossing_layers(model: CausalLM) -> tuple[int, ...]:
    """The MoE layers whose experts a CUDA graph cannot capture (the executor is not `graph_safe`): a decode step
    crosses to them eagerly. Dense layers and graph-safe experts stay inside the graphs."""
    return tuple(moe.layer for moe in _crossings(model))


def _crossings(model: CausalLM) -> list[MoELayer]:
    return [moe for moe in model.moe_layers() if not moe.executor.graph_safe]


def choose_graphs(model: CausalLM, cache: PagedKVCache) -> GraphChoice:
    """Which kind of CUDA graph can replay a decode step of `model` over `cache`, and why."""
    if cache.k.device.type != "cuda":
        return GraphChoice(None, f"CUDA graphs need a CUDA device, not {cache.k.device}")
    attention = cache.backend.name
    if not cache.backend.graph_safe:
        return GraphChoice(None, f"the {attention} attention backend plans on the host")
    crossings = _crossings(model)
    if not crossings:
        return GraphChoice("whole", f"one graph a step: the {attention} attention and every layer's experts are "
                                    "graph-safe")
    executors = sorted({type(moe.executor).__name__ for moe in crossings})
    span = _layer_span(tuple(moe.layer for moe in crossings), model.config.num_layers)
    return GraphChoice("piecewise", f"{len(crossings) + 1} graphs a step around {len(crossings)} eager crossings: "
                                    f"the experts of {span} ({', '.join(executors)}) "
                                    "run in other processes or on a backend that syncs with the host")


def _layer_span(layers: tuple[int, ...], num_layers: int) -> str:
    if len(layers) == num_layers:
        return f"all {num_layers} layers"
    return f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes graphs are captured for: 1, 2, 4, 8, then every 8 up to `max_num_seqs` (a decode batch is
    padded up to the next one, so at most 7 padded rows past 8)."""
    small = [b for b in (1, 2, 4) if b < max_num_seqs]
    return tuple(small + list(range(8, max_num_seqs, 8)) + [max_num_seqs])


@dataclass(frozen=True)
class CapturedPiece:
    """A captured graph and the output its capture returned (a tensor of the pool every replay rewrites)."""

    graph: torch.cuda.CUDAGraph
    out: torch.Tensor | None

    def __call__(self) -> torch.Tensor | None:
        self.graph.replay()
        return self.out


class GraphCapture:
    """One capture stream and one memory pool for every graph a runner captures.

    Does what `torch.cuda.graph` does (capture on a side stream, never the legacy default one; synchronize and
    release cached memory before capturing) but leaves each graph's begin and end to the caller, so a step can be
    captured as several graphs sharing one pool. They must then replay in the order they were captured: a later
    graph may reuse memory an earlier one freed. Warm-up runs on the capture stream itself, so lazily made
    per-stream state (cuBLAS workspaces) exists before capture.
    """

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream()
        self.pool = torch.cuda.graph_pool_handle()

    def warm(self, fn: Callable[[], object], times: int = 2) -> None:
        """Run `fn` eagerly on the capture stream: compiles kernels, builds cached tensors, settles the allocator."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(times):
                fn()
        torch.cuda.current_stream().wait_stream(self.stream)

    def settle(self) -> None:
        """Before a step's captures: nothing in flight, cached blocks back to the device."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def capture(self, fn: Callable[[], torch.Tensor | None]) -> CapturedPiece:
        """Capture the kernels `fn` launches. thread_local: only this thread's unsafe calls break the capture, not
        another thread's legal ones (a channel's NCCL watchdog)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                graph.capture_end()
        return CapturedPiece(graph, out)


class DecodeGraphs:
    """The whole decode step of each bucket as one graph."""

    def __init__(self, runner: DecodeRunner):
        self.runner = runner
        self._steps: dict[int, CapturedPiece] = {}  # bucket -> its step, returning logits [bucket, V]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket of the runner; call before serving (it runs each bucket's forward twice eagerly)."""
        t0 = time.perf_counter()
        capture = GraphCapture()
        for bucket in sorted(self.runner.decode_buckets, reverse=True):
            self.runner.prepare_decode([], bucket)  # all padding: a valid step that writes no KV
            step = functools.partial(self.runner.forward_decode, bucket)
            capture.warm(step)
            capture.settle()
            self._steps[bucket] = capture.capture(step)
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s in %.1fs", sorted(self._steps), time.perf_counter() - t0)

    def replay(self, bucket: int) -> torch.Tensor:
        """logits [bucket, V] of the step `prepare_decode` laid into `bucket`'s buffers (a view the next replay
        overwrites)."""
        return self._steps[bucket]()

    def __contains__(self, bucket: int) -> bool:
        return bucket in self._steps
