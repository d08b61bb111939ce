"""Turns a `SchedulerOutput` into one forward pass over the paged cache and returns the logits to sample.

A step's integer inputs (token ids, positions, slots, context lengths, query starts, logit rows, and the block ids
appended to its sequences' tables since their last step) are laid out on the host in one persistent int32 buffer
(pinned when CUDA is available) and reach the device in one non-blocking copy into a persistent device buffer: no
per-step allocation, no host sync, no .tolist()/.item(). The block tables themselves stay on the device
(`cluster.engine.device_tables`): a step gathers its rows there. A token sampled by the step before, not yet read
back (`Sequence.pending`), is written into the inputs on the device.

Decode-only steps can also run over static buffers padded to a batch-size bucket (`prepare_decode` then
`forward_decode`): the same device tensors every step of that bucket, so CUDA graphs can capture the forward once
and replay it (whole, or in pieces around experts in other processes: `cluster.engine.cuda_graphs`). Padding rows
carry token 0 at position 0, slot -1 (its KV write is skipped) and context 0 (its attention output is zeros); their
logits are computed and ignored. `decode_buckets` makes `run` take that path. A step with a sequence that scores its
prompt (`cluster.engine.prompt_logprobs`) runs eagerly over its own rows: those rows' scores come out of `forward`
into the step's `ScheduledSeq.prompt_logprobs`.

Each forward runs under a context the runner makes (`step_context`, `cluster.model.forward_context`): the share of
the runner's `ExpertLoad` its MoE layers count into. `begin_step` lays the step out on the device before the first
layer (attention's plan in the cache, the routing count's weights), inside whatever graph captures the forward. The
graphs take the runner through their own protocol (`cluster.engine.cuda_graphs.DecodeRunner`) and import nothing of
this module.

Legend: T = new tokens, B = sequences, NB = block-table width, S = sequences that sample, V = vocab.
"""

from __future__ import annotations

import numpy as np
import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.engine.cuda_graphs import DecodeGraphs, GraphKind, choose_graphs
from cluster.engine.device_tables import DeviceBlockTables
from cluster.engine.paged_cache import PagedKVCache
from cluster.engine.piecewise_graphs import PiecewiseGraphs
from cluster.engine.prompt_logprobs import PromptRows, PromptScoring
from cluster.engine.scheduler import ScheduledSeq, SchedulerOutput
from cluster.engine.step_inputs import PendingTokens, StepInputs
from cluster.model.decoder import CausalLM
from cluster.model.forward_context import ForwardContext, forward_context
from cluster.moe.load import ExpertLoad


def step_order(num_computed: int, num_new: int) -> tuple[bool, int]:
    """Sort key of a scheduled sequence: single-token decodes first, shortest context first, so the paged cache
    attends to neighbouring lengths together."""
    return num_new != 1, num_computed + num_new


class PackedInts:
    """A persistent int32 host buffer and its device twin. `send` lays arrays end to end on the host and moves them
    in one non-blocking copy; on a CPU device the host buffer is the device buffer."""

    def __init__(self, device: torch.device, capacity: int = 1 << 14):
        self.device = device
        self.capacity = 0
        self._copied = torch.cuda.Event() if device.type == "cuda" else None  # recorded after each copy
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        self.capacity = capacity
        on_cuda = self.device.type == "cuda"
        # Normal tensors even when built under inference mode (graph capture is): `send` writes them in place later,
        # which torch refuses on an inference tensor outside inference mode.
        with torch.inference_mode(False):
            self.host = torch.zeros(capacity, dtype=torch.int32, pin_memory=on_cuda and torch.cuda.is_available())
            self.device_buffer = torch.zeros(capacity, dtype=torch.int32, device=self.device) if on_cuda else self.host
        self._host_np = self.host.numpy()

    def send(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        """Device views of `parts`, in order. The previous copy must be done before its host bytes are rewritten:
        waiting on its event costs nothing once the step that used it has finished."""
        total = sum(p.size for p in parts)
        if self._copied is not None:
            self._copied.synchronize()
        if total > self.capacity:
            self._grow(max(total, 2 * self.capacity))  # the old device buffer lives on in the views handed out
        offset, views = 0, []
        for p in parts:
            self._host_np[offset:offset + p.size] = p.ravel()
            views.append(self.device_buffer[offset:offset + p.size])
            offset += p.size
        if self._copied is not None:
            self.device_buffer[:total].copy_(self.host[:total], non_blocking=True)
            self._copied.record()
        return views


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, decode_buckets: tuple[int, ...] = (),
                 expert_load: ExpertLoad | None = None, max_num_seqs: int = 64):
        """decode_buckets: batch sizes a decode-only step is padded up to (the smallest that holds it) and run over
        static buffers; empty: every step runs exactly its own rows. expert_load: where this runner's forwards count
        their routing (None: not counted). max_num_seqs: the engine's, for the device block tables' first rows."""
        self.model = model
        self.cache = cache
        self.expert_load = expert_load
        self.device = model.lm_head.weight.device
        self.decode_buckets = tuple(sorted(decode_buckets))
        # Static table width: no sequence outgrows the model's context or the cache.
        self.max_blocks = min(-(-model.config.max_position_embeddings // cache.block_size), cache.num_blocks)
        self._step = PackedInts(self.device)
        # A static decode step's changes besides its fixed inputs: pending tokens' rows, new block-table entries.
        self._diff = PackedInts(self.device, capacity=1024)
        with torch.inference_mode(False):  # written in place every step (see `PackedInts`)
            self.tables = DeviceBlockTables(2 * max_num_seqs, self.max_blocks, self.device)
        self._static: dict[int, tuple[PackedInts, StepInputs]] = {}
        self.graphs: DecodeGraphs | PiecewiseGraphs | None = None  # set by `capture_graphs`
        self.use_graphs = False  # replay captured graphs for decode steps (off: the same buffers, eagerly)

    def capture_graphs(self, kind: GraphKind = "whole") -> None:
        """Capture the decode forward of every bucket (`cluster.engine.cuda_graphs.choose_graphs` says which kind
        the model allows); decode steps then replay it."""
        allowed = choose_graphs(self.model, self.cache)
        if allowed.kind is None or (kind, allowed.kind) == ("whole", "piecewise"):
            raise ValueError(f"cannot capture {kind} decode graphs: {allowed.reason}")
        self.graphs = PiecewiseGraphs(self) if kind == "piecewise" else DecodeGraphs(self)
        self.graphs.capture()
        self.use_graphs = True

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """Forward the step; return (logits [S, V] fp32, the S scheduled sequences that sample, in that order)."""
        items = sorted(batch.scheduled, key=lambda s: step_order(s.seq.num_computed, s.num_new))
        sampling = [i for i, s in enumerate(items) if s.samples]
        bucket = self._bucket(items)
        if bucket:
            inputs = self.prepare_decode(items, bucket, batch.pending_tokens)
            replay = self.use_graphs and self.graphs is not None and bucket in self.graphs
            logits = self.graphs.replay(bucket) if replay else self.forward_decode(bucket)
            return logits.index_select(0, inputs.sample_rows[:len(sampling)]), [items[i] for i in sampling]
        inputs = self.prepare(items, batch.pending_tokens)
        return self.forward(inputs), [items[i] for i in sampling]

    def rows_for(self, batch: SchedulerOutput) -> int:
        """The rows `run(batch)` puts through the model: its tokens, or the bucket a decode step is padded to."""
        return self._bucket(batch.scheduled) or batch.num_tokens if batch else 0

    def _bucket(self, items: list[ScheduledSeq]) -> int | None:
        if not self.decode_buckets or any(s.num_new != 1 or s.seq.scores_prompt for s in items):
            return None
        return next((b for b in self.decode_buckets if b >= len(items)), None)

    # -- any step ----------------------------------------------------------------------------------------------
    def prepare(self, items: list[ScheduledSeq], pending: PendingTokens | None = None) -> StepInputs:
        """Lay out a step of sorted sequences (decodes first) and send it to the device; a sequence's pending token
        (`Sequence.pending`) is taken from `pending` on the device."""
        query_lens = [s.num_new for s in items]
        context_lens = [s.seq.num_computed + s.num_new for s in items]
        ids: list[int] = []
        fed: list[tuple[int, int]] = []  # (row of `ids`, row of `pending.tokens`) of each pending input
        for s in items:
            if s.seq.pending:
                fed.append((len(ids), _pending_row(pending, s)))
            ids += [0] if s.seq.pending else s.seq.token_slice(s.seq.num_computed, s.seq.num_computed + s.num_new)
        width = max(len(s.seq.block_table) for s in items)
        table_rows, writes = self.tables.update([s.seq for s in items])
        q_lens = np.array(query_lens, dtype=np.int32)
        qsl = np.zeros(len(items) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=qsl[1:])
        positions, slots = self._positions_and_slots(items, np.array(context_lens, dtype=np.int32), q_lens, qsl)
        logit_rows = qsl[1:][[i for i, s in enumerate(items) if s.samples]] - 1
        scored = PromptRows.of(items, qsl)
        parts = [np.array(ids, dtype=np.int32), positions, slots, np.array(context_lens, dtype=np.int32), qsl,
                 logit_rows.astype(np.int32), table_rows, *_fed_arrays(fed), *writes]
        ids_t, pos_t, slots_t, lens_t, qsl_t, rows_t, table_rows_t, fed_rows, fed_src, *writes_t = self._step.send(
            parts + ([scored.rows, scored.targets] if scored else []))
        writes_t, score_t = writes_t[:3], writes_t[3:]
        self.tables.write(*writes_t)
        tables_t = self.tables.rows[table_rows_t.long(), :width]  # [B, width], gathered on the device
        meta = AttentionMetadata(slots_t, tables_t, query_lens, context_lens, sum(1 for n in query_lens if n == 1),
                                 lens_t, qsl_t)
        if fed:
            _feed(ids_t, fed_rows, fed_src, pending)
        return StepInputs(ids_t, pos_t, meta, rows_t, scoring=PromptScoring(scored, *score_t) if scored else None)

    def _positions_and_slots(self, items: list[ScheduledSeq], context_lens: np.ndarray, q_lens: np.ndarray,
                             qsl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positions [T] and flat cache slots [T] of every new token, from the blocks the new tokens fall in."""
        bs = self.cache.block_size
        first = (context_lens - q_lens) // bs  # [B] the block of each sequence's first new token
        span = (context_lens - 1) // bs - first + 1  # [B] blocks its new tokens fall in
        blocks = np.zeros((len(items), int(span.max())), dtype=np.int32)  # [B, span]
        for i, s in enumerate(items):
            blocks[i, :span[i]] = s.seq.block_table[first[i]:first[i] + span[i]]
        seq = np.repeat(np.arange(len(q_lens)), q_lens)  # [T] which sequence each token belongs to
        positions = (np.arange(int(qsl[-1])) - qsl[:-1][seq] + (context_lens - q_lens)[seq]).astype(np.int32)
        slots = blocks[seq, positions // bs - first[seq]] * bs + positions % bs
        return positions, slots.astype(np.int32)

    def step_context(self, inputs: StepInputs) -> ForwardContext:
        """The context of a forward over `inputs` (no device work: for a bucket's static inputs, the same tensors
        every step, which is what a captured graph needs)."""
        load = self.expert_load
        return ForwardContext(load.step(inputs.input_ids.shape[0]) if load is not None else None)

    def begin_step(self, inputs: StepInputs, context: ForwardContext) -> None:
        """What a forward lays out before its first layer: attention's plan (the cache) and the routing count's
        weights (device ops, so a graph that captures this replays them: the eager forward and a piecewise step's
        first piece both call it)."""
        self.cache.begin_step(inputs.meta)
        if context.expert_step is not None:
            context.expert_step.lay_out(inputs.meta.slot_mapping)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """logits [S, V] fp32 of the sampling rows (and the prompt scores of `inputs.scoring`, handed out)."""
        context = self.step_context(inputs)
        with forward_context(context):
            self.begin_step(inputs, context)
            hidden = self.model(inputs.input_ids, inputs.positions, self.cache)  # [T, D]
        if inputs.scoring is not None:
            inputs.scoring.score(self.model, hidden)
        return self.model.compute_logits(hidden[inputs.logit_rows])

    # -- decode-only steps over static buffers -----------------------------------------------------------------
    def prepare_decode(self, items: list[ScheduledSeq], bucket: int,
                       pending: PendingTokens | None = None) -> StepInputs:
        """Write a decode batch (one new token per sequence, sorted) into `bucket`'s static buffers, padded to
        `bucket` rows; pending tokens come from `pending` on the device. Returns the static inputs: the same tensors
        for every call with this bucket."""
        if len(items) > bucket or any(s.num_new != 1 for s in items):
            raise ValueError(f"prepare_decode takes at most {bucket} single-token decodes, got "
                             f"{[s.num_new for s in items]}")
        packed, inputs = self._static_inputs(bucket)
        n, bs = len(items), self.cache.block_size
        context_lens = [s.seq.num_computed + 1 for s in items] + [0] * (bucket - n)
        ids = np.zeros(bucket, dtype=np.int32)
        ids[:n] = [0 if s.seq.pending else s.seq.token_slice(s.seq.num_computed, s.seq.num_computed + 1)[0]
                   for s in items]
        lens = np.array(context_lens, dtype=np.int32)
        positions = np.maximum(lens - 1, 0)
        slots = np.full(bucket, -1, dtype=np.int32)
        slots[:n] = [s.seq.block_table[s.seq.num_computed // bs] * bs + s.seq.num_computed % bs for s in items]
        qsl = np.arange(bucket + 1, dtype=np.int32)
        sample_rows = np.zeros(bucket, dtype=np.int32)
        sampling = [i for i, s in enumerate(items) if s.samples]
        sample_rows[:len(sampling)] = sampling
        # Padding rows read row 0's table: they attend to nothing (context 0), and it holds valid block ids.
        table_rows = np.zeros(bucket, dtype=np.int32)
        table_rows[:n], writes = self.tables.update([s.seq for s in items])
        packed.send([ids, positions, slots, lens, qsl, qsl[:bucket], sample_rows, table_rows])
        inputs.meta.context_lens = context_lens  # the host view, for backends that plan on the host
        fed = [(i, _pending_row(pending, s)) for i, s in enumerate(items) if s.seq.pending]
        if fed or writes[0].size:
            fed_rows, fed_src, *writes_t = self._diff.send(_fed_arrays(fed) + writes)
            self.tables.write(*writes_t)
        torch.index_select(self.tables.rows, 0, inputs.table_rows, out=inputs.meta.block_tables)
        if fed:
            _feed(inputs.input_ids, fed_rows, fed_src, pending)
        return inputs

    @torch.inference_mode()
    def forward_decode(self, bucket: int) -> torch.Tensor:
        """logits [bucket, V] fp32 over `bucket`'s static buffers (as `prepare_decode` left them); padding rows'
        logits are meaningless. Reads no host data besides shapes with a graph-safe backend."""
        return self.forward(self._static[bucket][1])

    @torch.inference_mode()
    def run_padding(self) -> None:
        """A forward of one padding row (token 0 at position 0, no KV written, its logits dropped): a step for a
        data-parallel rank with nothing to compute while the others step, so that it joins every MoE layer's
        exchange."""
        self.prepare_decode([], 1)
        self.forward_decode(1)

    def _static_inputs(self, bucket: int) -> tuple[PackedInts, StepInputs]:
        if bucket not in self._static:
            sizes = (bucket, bucket, bucket, bucket, bucket + 1, bucket, bucket, bucket)
            packed = PackedInts(self.device, capacity=sum(sizes))
            ids, pos, slots, lens, qsl, rows, sample, table_rows = packed.send([np.zeros(n, np.int32) for n in sizes])
            with torch.inference_mode(False):  # written in place every step (see `PackedInts`)
                tables = torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=self.device)
            meta = AttentionMetadata(slots, tables, [1] * bucket, [0] * bucket, bucket, lens, qsl)
            self._static[bucket] = packed, StepInputs(ids, pos, meta, rows, sample, table_rows=table_rows)
        return self._static[bucket]


def _fed_arrays(fed: list[tuple[int, int]]) -> list[np.ndarray]:
    """[rows of the step's input ids, rows of the pending tokens], int32 (empty arrays when nothing is pending)."""
    return [np.array([r for r, _ in fed], np.int32), np.array([j for _, j in fed], np.int32)]


def _feed(input_ids: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, pending: PendingTokens) -> None:
    """input_ids[rows] = pending.tokens[src], on the device: the host never reads the pending tokens."""
    input_ids.index_copy_(0, rows.long(), pending.tokens.index_select(0, src.long()).to(input_ids.dtype))


def _pending_row(pending: PendingTokens | None, s: ScheduledSeq) -> int:
    """The row of `pending.tokens` holding the next input of `s`, a sequence with a pending token."""
    if pending is None or s.seq.seq_id not in pending.index or s.num_new != 1:
        raise ValueError(f"sequence {s.seq.seq_id} has a pending token but the step does not say where it is")
    return pending.index[s.seq.seq_id]
