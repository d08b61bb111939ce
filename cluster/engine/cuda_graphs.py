"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once at start-up.

A decode step of a Mixtral is a few hundred small kernels per layer; launched one by one from Python, the launches
cost more than an H200 takes to read the weights. The model runner lays a decode batch into static buffers padded
to a bucket (`ModelRunner.prepare_decode`), so the forward over them (`forward_decode`) touches the same device
memory every step: captured once per bucket, a step is then one graph launch.

Capture needs every kernel compiled and every lazily built tensor (rotary frequencies, expert maps) made before
it: each bucket's forward runs eagerly on a side stream first. Graphs share one memory pool, largest bucket first,
so the smaller ones reuse its activations' memory. Only a forward whose experts live in this process can be
captured: a step that crosses to shards in other processes runs eagerly (`graph_blocker` says why).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cluster.engine.model_runner import ModelRunner
    from cluster.engine.paged_cache import PagedKVCache
    from cluster.model.decoder import CausalLM

log = logging.getLogger(__name__)


def graph_blocker(model: CausalLM, cache: PagedKVCache) -> str | None:
    """Why a decode step of `model` over `cache` cannot be captured, or None when it can."""
    if cache.k.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {cache.k.device}"
    if not cache.backend.graph_safe:
        return f"the {cache.backend.name} attention backend plans on the host"
    for layer in model.model.layers:
        moe = getattr(layer, "block_sparse_moe", None)
        if moe is not None and not getattr(moe.executor, "graph_safe", False):
            return (f"the experts ({type(moe.executor).__name__}) run in other processes or on a backend that "
                    "syncs with the host")
    return None


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes graphs are captured for: 1, 2, 4, 8, then every 8 up to `max_num_seqs` (a decode batch is
    padded up to the next one, so at most 7 padded rows past 8)."""
    small = [b for b in (1, 2, 4) if b < max_num_seqs]
    return tuple(small + list(range(8, max_num_seqs, 8)) + [max_num_seqs])


class DecodeGraphs:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its logits)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket of the runner; call before serving (it runs each bucket's forward twice eagerly)."""
        t0 = time.perf_counter()
        pool = None
        for bucket in sorted(self.runner.decode_buckets, reverse=True):
            self.runner.prepare_decode([], bucket)  # all padding: a valid step that writes no KV
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles kernels, builds cached tensors, settles the allocator
                    self.runner.forward_decode(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.runner.forward_decode(bucket)
            pool = graph.pool()
            self._graphs[bucket] = graph, logits
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s in %.1fs", sorted(self._graphs),
                 time.perf_counter() - t0)

    def replay(self, bucket: int) -> torch.Tensor:
        """logits [bucket, V] of the step `prepare_decode` laid into `bucket`'s buffers (a view the next replay
        overwrites)."""
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits

    def __contains__(self, bucket: int) -> bool:
        return bucket in self._graphs
