"""What one forward pass hands its layers beyond their inputs, current for the length of that forward.

The engine's model runner makes a `ForwardContext` for each forward and makes it current (`forward_context`) while
the model runs; the MoE layers read it (`current_context`) to count their routing (`cluster.moe.load`). A model run
outside the engine (parity tests, generation over a contiguous cache) has no context and counts nothing.

Attention's per-step layout stays with the cache (`KVCache.begin_step`): each cache kind lays out its own, and the
attention layer already holds its cache.

A `ContextVar`, so each thread sees its own context: two engines stepping one shared model on two threads count
apart. With CUDA graphs the context is read while a graph is captured; what it holds (device tensors) is what the
captured kernels keep reading at each replay.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from cluster.moe.load import ExpertStep


@dataclass(frozen=True)
class ForwardContext:
    expert_step: ExpertStep | None = None  # where the MoE layers count their routing (None: not counted)


_CURRENT: ContextVar[ForwardContext | None] = ContextVar("forward_context", default=None)


@contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    """Make `context` current in this thread until the block ends (nested blocks restore the outer one)."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def current_context() -> ForwardContext | None:
    """The context of the forward under way in this thread, None outside one."""
    return _CURRENT.get()
