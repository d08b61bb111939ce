"""A decode step split at the experts it cannot capture: graphs between the crossings, the crossings eager.

A unit's shards in other processes are reached over a channel (NCCL rounds, host-side waits): no CUDA graph can
hold that, but everything around it can. So the step over a bucket's static buffers is cut at each crossing layer
(`crossing_layers`: an MoE layer whose executor is not graph-safe):

    piece 0      embeddings, whole layers before the first crossing, the crossing layer's attention and router
    crossing 0   its executor, eagerly: x, topk ids and weights in, the experts' weighted sum out
    piece 1      that layer's residual add, whole layers up to the next crossing, its attention and router
    ...
    piece C      the last residual add, the remaining layers, the final norm and the logits

Pieces and crossings hand each other data only through `CrossingBuffers`, fixed tensors outside the graph pool: a
piece captured once keeps writing the tensors its crossing reads, and reads the one the crossing writes. Every
crossing of every bucket shares one set (row views of the largest bucket's), since only one step runs at a time.

`DecodePieces.run` runs the split eagerly (so CPU tests check it against the model's own forward, bit for bit) or
through captured pieces: `PiecewiseGraphs` only captures each piece and replays that same sequence, C + 1 graph
launches and C crossings a step.

Every piece runs under the bucket's forward context (the runner's `step_context`, the same tensors every step), so
each piece's routing is counted as the whole forward's is; piece 0 begins the step (the runner's `begin_step`:
attention's plan and the expert count's weights), so its graph replays that layout before any layer reads it.

Legend: B = bucket rows, D = hidden, K = experts per token, V = vocab.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cluster.engine.cuda_graphs import CapturedPiece, DecodeRunner, GraphCapture, crossing_layers
from cluster.model.forward_context import forward_context

if TYPE_CHECKING:
    from cluster.engine.step_inputs import StepInputs
    from cluster.model.decoder import DecoderLayer
    from cluster.moe.executor import ExpertExecutor

log = logging.getLogger(__name__)

Piece = Callable[[], torch.Tensor | None]  # the last piece returns logits [B, V]; the others None


@dataclass(frozen=True)
class CrossingBuffers:
    residual: torch.Tensor  # [B, D] the crossing layer's stream after attention
    moe_in: torch.Tensor  # [B, D] its post-attention norm: the experts' input
    topk_ids: torch.Tensor  # [B, K] int64 (as the router gives them)
    topk_weights: torch.Tensor  # [B, K] fp32
    moe_out: torch.Tensor  # [B, D] the experts' weighted sum

    @classmethod
    @torch.inference_mode()
    def allocate(cls, rows: int, hidden: int, top_k: int, dtype: torch.dtype,
                 device: torch.device) -> CrossingBuffers:
        def zeros(width: int, dt: torch.dtype) -> torch.Tensor:
            return torch.zeros(rows, width, dtype=dt, device=device)

        return cls(zeros(hidden, dtype), zeros(hidden, dtype), zeros(top_k, torch.int64),
                   zeros(top_k, torch.float32), zeros(hidden, dtype))

    def rows(self, n: int) -> CrossingBuffers:
        """Views of the first n rows (contiguous)."""
        return CrossingBuffers(*(t[:n] for t in (self.residual, self.moe_in, self.topk_ids, self.topk_weights,
                                                 self.moe_out)))


@dataclass(frozen=True)
class Crossing:
    """Layer `layer`'s executor, run eagerly between two pieces on the buffers' routed tokens."""

    layer: int
    executor: ExpertExecutor
    buffers: CrossingBuffers

    def __call__(self) -> None:
        b = self.buffers
        b.moe_out.copy_(self.executor(self.layer, b.moe_in, b.topk_ids, b.topk_weights))


class DecodePieces:
    """One bucket's decode step over its static inputs, as pieces with a crossing between each two."""

    def __init__(self, runner: DecodeRunner, inputs: StepInputs, buffers: CrossingBuffers):
        """inputs: the bucket's static inputs (`runner.prepare_decode`); buffers: rows for the bucket."""
        self.runner = runner
        self.model = model = runner.model
        self.cache = runner.cache
        self.inputs = inputs
        self.context = runner.step_context(inputs)
        self.buffers = buffers
        self.layers: list[DecoderLayer] = list(model.model.layers)
        self.moes = {moe.layer: moe for moe in model.moe_layers()}  # layer index -> its MoE block
        cuts = crossing_layers(model)
        self.crossings = [Crossing(i, self.moes[i].executor, buffers) for i in cuts]
        starts, stops = (0, *(c + 1 for c in cuts)), (*cuts, len(self.layers))
        self.pieces: list[Piece] = [functools.partial(self._piece, first, stop)
                                    for first, stop in zip(starts, stops)]

    @torch.inference_mode()
    def run(self, pieces: Sequence[Piece] | None = None) -> torch.Tensor:
        """logits [B, V] of the step laid out in the static inputs: each piece (`pieces`, the captured ones; by
        default `self.pieces`, eagerly), with the crossings between them."""
        pieces = self.pieces if pieces is None else pieces
        for piece, crossing in zip(pieces, self.crossings):
            piece()
            crossing()
        return pieces[-1]()

    def _piece(self, first: int, stop: int) -> torch.Tensor | None:
        """Layers [first, stop) whole; then layer `stop`'s attention and router (or, past the last layer, the
        logits). Reads and writes device tensors only, so a graph can hold it."""
        with forward_context(self.context):  # whoever runs the piece (eagerly, warming, capturing) counts the same
            return self._layers(first, stop)

    def _layers(self, first: int, stop: int) -> torch.Tensor | None:
        inputs, b = self.inputs, self.buffers
        if first == 0:
            self.runner.begin_step(inputs, self.context)
            x, residual = self.model.model.embed_tokens(inputs.input_ids), None  # [B, D]
        else:
            x, residual = b.moe_out, b.residual  # the end of layer first - 1, added in the next norm
        x, residual = self.model.run_layers(x, residual, inputs.positions, self.cache, first, stop)
        if stop == len(self.layers):
            return self.model.compute_logits(self.model.final_norm(x, residual)[inputs.logit_rows])  # [B, V]
        layer = self.layers[stop]
        x, h = layer.attend(x, inputs.positions, self.cache, residual)  # DecoderLayer.forward up to its experts
        weights, ids = self.moes[stop].route(h)  # [B, K] fp32, [B, K]
        b.residual.copy_(x)
        b.moe_in.copy_(h)
        b.topk_ids.copy_(ids)
        b.topk_weights.copy_(weights)
        return None


class PiecewiseGraphs:
    """Each bucket's decode step as `DecodePieces` whose pieces are captured graphs."""

    def __init__(self, runner: DecodeRunner):
        self.runner = runner
        self._steps: dict[int, tuple[DecodePieces, list[CapturedPiece]]] = {}
        self.buffers: CrossingBuffers | None = None  # the largest bucket's rows; every bucket uses a prefix

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's pieces; call before serving. Each bucket's step first runs twice eagerly (with
        real crossings over all-padding rows); the crossings do not run during capture, whose tensors hold no
        values yet."""
        t0 = time.perf_counter()
        runner, model = self.runner, self.runner.model
        buckets = sorted(runner.decode_buckets, reverse=True)
        if not buckets:
            return
        self.buffers = CrossingBuffers.allocate(buckets[0], model.config.hidden_size, model.config.experts_per_token,
                                                model.model.embed_tokens.weight.dtype, runner.device)
        capture = GraphCapture()
        for bucket in buckets:
            inputs = runner.prepare_decode([], bucket)  # all padding: a valid step that writes no KV
            pieces = DecodePieces(runner, inputs, self.buffers.rows(bucket))
            capture.warm(pieces.run)
            capture.settle()
            self._steps[bucket] = pieces, [capture.capture(piece) for piece in pieces.pieces]
        torch.cuda.synchronize()
        graphs = len(next(iter(self._steps.values()))[1])
        log.info("captured piecewise decode graphs (%d a step) for batch sizes %s in %.1fs", graphs,
                 sorted(self._steps), time.perf_counter() - t0)

    def replay(self, bucket: int) -> torch.Tensor:
        """logits [bucket, V] of the step `prepare_decode` laid into `bucket`'s buffers (a view the next replay
        overwrites)."""
        pieces, captured = self._steps[bucket]
        return pieces.run(captured)

    def __contains__(self, bucket: int) -> bool:
        return bucket in self._steps
