"""The engine: admit requests, and `step()` = schedule, launch (forward and sampling on the device), hand out (read the
tokens back, detokenize, stop). With `EngineConfig.async_scheduling` a call launches a step before handing out the
one the previous call launched, so the host's work overlaps the device's."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from cluster.engine.block_manager import BlockManager
from cluster.engine.config import CPU_PREFILL_BUDGET_BESIDE_DECODES, EngineConfig
from cluster.engine.cost_probe import measure_step_cost
from cluster.engine.cuda_graphs import choose_graphs, decode_buckets
from cluster.engine.grammar_paths import is_failure
from cluster.engine.guided import GrammarError, GrammarFault, GrammarGuide, as_fault
from cluster.engine.model_runner import ModelRunner
from cluster.engine.outputs import ContextLengthError, RequestError, RequestOutput, TokenLogprobs
from cluster.engine.paged_cache import PagedKVCache, kv_bytes_per_block
from cluster.engine.sampler import DeviceSample, Sampler, SamplerOutput, SamplingRow, make_generator
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from cluster.engine.sequence import Sequence
from cluster.engine.step_cost import StepCost
from cluster.engine.stats import EngineStats
from cluster.engine.step_inputs import PendingTokens
from cluster.engine.stop import StopStringFilter
from cluster.engine.warm_up import warm_up
from cluster.model.decoder import CausalLM
from cluster.moe.load import ExpertLoad
from cluster.parallel.dispatch import ExpertParallelExecutor
from cluster.tokenizer.detokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)

_MAX_PENDING_STEPS = 1 << 16  # step sizes kept for the metrics sampler between two reads (the oldest go first)


class _SeqOutput:
    """Per-choice text state: the incremental detokenizer, the stop-string filter, and the tokens waiting for their
    text to be emitted.

    A choice's outputs carry the tokens of its content: each token is handed out once the content reaches its text
    (a token whose text the stop filter holds back waits), and tokens whose text lies wholly in a stop string are
    never handed out. So the tokens (and their logprobs) spell the content, but for a token that holds both the end
    of the content and the start of a stop string.
    """

    def __init__(self, seq: Sequence, decode: Callable[[list[int]], str]):
        self.detok = IncrementalDetokenizer(decode)
        self.stop = StopStringFilter(seq.params.stop)
        self.produced = 0  # characters the detokenizer has produced
        self.emitted = 0  # characters of content emitted (the rest is held back or a stop string)
        self.waiting: list[tuple[int, TokenLogprobs | None, int]] = []  # (token, logprobs, its first character)
        self.prompt_logprobs_due = seq.params.prompt_logprobs is not None  # they go with the choice's first output

    def push(self, token: int, logprobs: TokenLogprobs | None,
             can_stop: bool = True) -> tuple[str, list[tuple[int, TokenLogprobs | None]]]:
        """A generated token -> (the content it completes, the tokens to hand out with it); `can_stop` false: the
        output is not past its min_tokens yet, and no stop string may end in this token's text."""
        self.waiting.append((token, logprobs, self.produced))
        piece = self.detok.add([token])
        self.produced += len(piece)
        return self._emit(self.stop.push(piece, can_stop))

    def flush(self) -> tuple[str, list[tuple[int, TokenLogprobs | None]]]:
        """At a finish other than a stop string: the content and tokens still held back."""
        text = "" if self.stop.stopped else self.stop.push(self.detok.flush()) + self.stop.flush()
        text, handed = self._emit(text)
        rest, self.waiting = self.waiting, []
        return text, handed + ([] if self.stop.stopped else [(t, lp) for t, lp, _ in rest])

    def _emit(self, text: str) -> tuple[str, list[tuple[int, TokenLogprobs | None]]]:
        self.emitted += len(text)
        frontier_free = not self.stop.held and not self.stop.stopped  # nothing held: tokens without text go too
        ready = [w for w in self.waiting if w[2] < self.emitted or (frontier_free and w[2] == self.emitted)]
        self.waiting = [] if self.stop.stopped else self.waiting[len(ready):]
        return text, [(t, lp) for t, lp, _ in ready]


@dataclass
class _Launched:
    """A step started on the device, its tokens not read back yet."""

    batch: SchedulerOutput
    sampling: list[ScheduledSeq]  # the sequences that sample, in the order of `sample`'s rows
    rows: list[SamplingRow]
    faults: dict[int, GrammarFault]  # guided sequences whose grammar failed as the step was laid out
    sample: DeviceSample | None  # None: no sequence samples
    logits: torch.Tensor | None  # kept where a guided row may have to draw again (`_keep_in_budget`)


def _may_run_past(step: _Launched) -> bool:
    """Whether the next step may be scheduled before `step`'s tokens are read back: none of its sampled rows needs
    its token on the host to lay out its next step (a grammar's mask and way, the penalties' counts)."""
    return all(r.allowed is None and not (r.params.frequency_penalty or r.params.presence_penalty) for r in step.rows)


class LLMEngine:
    def __init__(self, model: CausalLM, decode: Callable[[list[int]], str], eos_id: int,
                 config: EngineConfig = EngineConfig(), guide: GrammarGuide | None = None):
        """`guide` enforces requests' grammars (structured output); without it such requests are refused."""
        self.model = model
        self.config = config
        self.decode = decode
        self.eos_id = eos_id
        self.guide = guide
        mc = model.config
        self.context_len = mc.max_position_embeddings
        self.device = device = model.lm_head.weight.device
        dtype = model.lm_head.weight.dtype
        if config.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
        num_blocks = _num_blocks(config, kv_bytes_per_block(mc, config.block_size, dtype), device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        cache = PagedKVCache(mc, num_blocks, config.block_size, dtype, device, backend=config.attention_backend)
        # The count of tokens routed to each expert (None for a dense model), kept by the runner's forwards.
        self.expert_load = ExpertLoad.for_model(mc, device, max(config.max_num_batched_tokens, config.max_num_seqs))
        graphs = choose_graphs(model, cache) if config.cuda_graphs else None
        if graphs is not None and graphs.kind is None:
            log.warning("decode steps run eagerly: %s", graphs.reason)
        elif graphs is not None:
            log.info("decode steps replay %s CUDA graphs: %s", graphs.kind, graphs.reason)
        kind = graphs.kind if graphs is not None else None
        self.runner = ModelRunner(model, cache, decode_buckets(config.max_num_seqs) if kind else (), self.expert_load,
                                  config.max_num_seqs)
        if device.type == "cuda":
            warm_up(self.runner, config.max_num_batched_tokens, num_blocks)
        if kind:
            self.runner.capture_graphs(kind)
        cost = _step_cost(config, self.runner, num_blocks)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   _prefill_budget_beside_decodes(config, device), cost,
                                                   self.context_len), self.blocks)
        if self.expert_load is not None:
            self.expert_load.reset()  # warm-up, capture and cost-probe steps routed made-up tokens
        self.sampler = Sampler()
        self.requests: dict[str, list[Sequence]] = {}
        self.siblings: dict[str, list[Sequence]] = {}  # choices 1..n-1, admitted once choice 0 has its prompt KV
        self.outputs: dict[int, _SeqOutput] = {}
        self._unsent: list[RequestOutput] = []  # outputs of a step that failed as a whole: `fail_all` hands them out
        self._ids = itertools.count()
        # Schedule each step while the last one runs (its outputs handed out after); see `_step`.
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None else (
            device.type == "cuda")
        self._in_flight: _Launched | None = None  # launched, its outputs not handed out yet
        # One rank of data-parallel attention (`cluster.engine.data_parallel`): called with the rows each step puts
        # through the model (0: nothing scheduled), it returns the most any rank does; a rank with nothing steps a
        # padding row then.
        self.step_sync: Callable[[int], int] | None = None
        self.step_tokens: deque[int] = deque(maxlen=_MAX_PENDING_STEPS)  # tokens each step computed, for metrics

    # -- admission ---------------------------------------------------------------------------------------------
    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise `RequestError` for a request that must not be scheduled; touches no state."""
        if params.n > self.config.max_n:
            raise RequestError(f"n is {params.n}; this server allows at most {self.config.max_n} choices per request")
        if not prompt:
            raise RequestError("the prompt must hold at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if params.logit_bias and not all(0 <= t < vocab for t, _ in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {vocab})")
        if not all(0 <= t < vocab for t in params.stop_token_ids):
            raise RequestError(f"stop_token_ids must be in [0, {vocab})")
        if params.grammar is not None and self.guide is None:
            raise RequestError("this server does not enforce output formats (it runs without a grammar engine)")
        if len(prompt) >= self.context_len:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens; the model's context is "
                                     f"{self.context_len} tokens, including the completion")
        total = len(prompt) + params.max_tokens
        if total > self.context_len:
            raise ContextLengthError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) is "
                                     f"{total} tokens, more than the model's context of {self.context_len} tokens")
        # The choices run side by side, each with its own completion: a request whose choices cannot all be resident
        # at once would hold the whole cache and advance only by preempting and recomputing its own choices. The
        # prompt blocks that choices share through the prefix cache are not counted (the bound stays plain).
        per_choice = self.blocks.blocks_for(total)
        need = params.n * per_choice
        if need > self.blocks.num_blocks:
            raise RequestError(f"the request needs {need} KV-cache blocks (n={params.n} x {per_choice} blocks of "
                               f"{self.blocks.block_size} tokens for {len(prompt)} prompt + {params.max_tokens} "
                               f"max_tokens) but the cache holds only {self.blocks.num_blocks}: lower n or max_tokens, "
                               f"or give the cache more memory")

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.validate(prompt, params)
        seqs = []
        # A GrammarError refuses the request before anything is kept.
        compiled = self.guide.compile(params.grammar, self.context_len) if params.grammar is not None else None
        for i in range(params.n):
            # Only a seeded choice needs a generator of its own; the others share the sampler's batched draw.
            seeded = params.seed is not None and not params.greedy
            seq = Sequence(next(self._ids), request_id, i, list(prompt), params,
                           generator=make_generator(params.seed + i, self.device) if seeded else None)
            if i == 0 and params.prompt_logprobs is not None:  # the first choice scores the prompt for all
                seq.prompt_logprobs = [None]
            seqs.append(seq)
        if compiled is not None:
            try:
                for seq in seqs:
                    self.guide.start(seq, compiled)
            except GrammarError:
                for seq in seqs:
                    self.guide.release(seq)
                raise
        for seq in seqs:
            self.outputs[seq.seq_id] = _SeqOutput(seq, self.decode)
        self.requests[request_id] = seqs
        self.scheduler.add(seqs[0])
        if len(seqs) > 1:
            self.siblings[request_id] = seqs[1:]

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request wherever it is; every block it held is freed. Unknown ids are ignored."""
        outs = []
        for seq in self.requests.get(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                outs.append(self._final(seq, "", []))
        self.siblings.pop(request_id, None)
        self._forget_if_done(request_id)
        if self._in_flight is not None and all(s.seq.is_finished for s in self._in_flight.batch.scheduled):
            self._in_flight = None  # nobody is left to read it
        return outs

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    # -- the step ----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step's outputs (with async scheduling, those of the step the previous call launched). A sequence
        whose grammar or output handling fails ends its request with an error output here, and the rest step on. If
        the step fails as a whole (it raises), the outputs it had made are kept for `fail_all`, which the caller must
        call: nothing is lost, and no request is left unanswered."""
        outs: list[RequestOutput] = []
        try:
            self._step(outs)
        except BaseException:
            self._unsent.extend(outs)
            raise
        return outs

    def _step(self, outs: list[RequestOutput]) -> None:
        """Launch a step and hand out the outputs of the one before it. With `async_scheduling` the step launched by
        the last call is still in flight here: the next is scheduled and launched first (its sequences' pending
        tokens read on the device), then the host reads and hands out the last one's tokens while the device runs
        (a step whose sampled rows need their tokens on the host first, grammars or penalties, is handed out
        before the next is scheduled). Without, each step is launched and handed out in the same call."""
        ahead, self._in_flight = self._in_flight, None
        if ahead is not None and not _may_run_past(ahead):
            self._hand_out(ahead, outs)
            ahead = None
        try:
            launched = self._launch(ahead)
        finally:
            if ahead is not None:
                self._hand_out(ahead, outs)
        if launched is not None and self.async_scheduling:
            self._in_flight = launched
        elif launched is not None:
            self._hand_out(launched, outs)

    def _launch(self, ahead: _Launched | None) -> _Launched | None:
        """Schedule a step and start it on the device: forward and sampling, nothing read back."""
        batch = self.scheduler.schedule()
        if self.step_sync is not None and self.step_sync(self.runner.rows_for(batch)) and not batch:
            self.runner.run_padding()  # the other ranks step: this one takes part in every layer's exchange
        if not batch:
            return None
        if ahead is not None and ahead.sample is not None:
            batch.pending_tokens = PendingTokens(ahead.sample.tokens, {s.seq.seq_id: i
                                                                       for i, s in enumerate(ahead.sampling)})
        logits, sampling = self.runner.run(batch)
        self.step_tokens.append(batch.num_tokens)
        for s in batch.scheduled:
            s.seq.num_computed += s.num_new
            if s.prompt_logprobs:  # scored in the forward, on the host already
                s.seq.prompt_logprobs.extend(s.prompt_logprobs)
        seqs = [s.seq for s in sampling]
        rows, faults = self._rows(seqs)  # grammar masks: on a GPU, while the forward pass runs
        sample = self.sampler.sample(logits, rows) if sampling else None
        for seq in seqs:
            seq.pending += 1
        guided = self.guide is not None and any(r.allowed is not None for r in rows)
        return _Launched(batch, sampling, rows, faults, sample, logits if guided else None)

    def _hand_out(self, step: _Launched, outs: list[RequestOutput]) -> None:
        """Read a launched step's tokens back and turn them into outputs (and finishes)."""
        sampled = step.sample.result() if step.sample is not None else None
        for s in step.sampling:
            s.seq.pending -= 1
        for s in step.batch.scheduled:
            if not s.seq.is_finished:
                self.blocks.register_full_blocks(s.seq)
        faults = step.faults
        if step.logits is not None:
            self._keep_in_budget(step.logits, step.rows, [s.seq for s in step.sampling], sampled, faults)
        for i, s in enumerate(step.sampling):
            if s.seq.is_finished:  # its request failed or was aborted after this step was launched
                continue
            try:
                if s.seq.seq_id in faults:
                    raise faults[s.seq.seq_id]
                outs.extend(self._append(s, sampled.token_ids[i], sampled.logprobs[i]))
            except BaseException as e:
                if not is_failure(e):
                    raise
                outs.extend(self._fail_request(s.seq, e))

    def _rows(self, seqs: list[Sequence]) -> tuple[list[SamplingRow], dict[int, GrammarFault]]:
        """The sampler's rows, with their grammar masks, and the guided sequences whose grammar failed."""
        rows = [SamplingRow(seq.params, seq.output, seq.generator, banned=self._not_yet(seq)) for seq in seqs]
        masks = self.guide.masks(seqs, self.context_len) if self.guide is not None else None
        if masks is None:
            return rows, {}
        for j, i in enumerate(masks[0]):
            rows[i].allowed = masks[1][j]
        return rows, masks[2]

    def _keep_in_budget(self, logits: torch.Tensor, rows: list[SamplingRow], seqs: list[Sequence],
                        sampled: SamplerOutput, faults: dict[int, GrammarFault]) -> None:
        """A guided row whose sampled token would leave its output no way to end within its tokens left takes its
        way's next token instead (`GrammarGuide.keep_in_budget`), drawn from a mask allowing only that token, so
        its logprobs are the model's for the token it got."""
        swaps: dict[int, int] = {}
        for i, seq in enumerate(seqs):
            if seq.seq_id in faults:
                continue
            try:
                token = self.guide.keep_in_budget(seq, sampled.token_ids[i], self.context_len)
            except BaseException as e:
                if not is_failure(e):
                    raise
                faults[seq.seq_id] = as_fault(e)
                continue
            if token != sampled.token_ids[i]:
                swaps[i] = token
        if swaps:
            idx = list(swaps)
            forced = [dataclasses.replace(rows[i], allowed=self.guide.only(swaps[i])) for i in idx]
            redrawn = self.sampler(logits[idx], forced)
            for j, i in enumerate(idx):
                sampled.token_ids[i], sampled.logprobs[i] = redrawn.token_ids[j], redrawn.logprobs[j]

    def _not_yet(self, seq: Sequence) -> tuple[int, ...]:
        """The tokens that would end `seq`'s output, while it is shorter than its min_tokens (vLLM's rule)."""
        p = seq.params
        if len(seq.output) + seq.pending >= p.min_tokens:
            return ()
        return p.stop_token_ids if p.ignore_eos else (*p.stop_token_ids, self.eos_id)

    def _append(self, s: ScheduledSeq, token: int, logprobs: TokenLogprobs | None) -> list[RequestOutput]:
        seq, p = s.seq, s.seq.params
        if not seq.output:
            self._start_siblings(seq)
        if p.max_tokens == 0:  # the prompt alone was wanted (scored): nothing is generated
            return [self._finish(seq, "length", "", [])]
        seq.output.append(token)
        out = self.outputs[seq.seq_id]
        stop_token = (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids
        complete = self.guide is not None and self.guide.advance(seq, token)  # the grammar's output is whole
        text, handed = ("", []) if stop_token else out.push(token, logprobs, len(seq.output) > p.min_tokens)
        if stop_token or out.stop.stopped or complete:
            reason = "stop"
        elif len(seq.output) >= p.max_tokens or seq.num_known >= self.context_len:
            reason = "length"
        else:
            return [self._delta(seq, text, handed)]
        rest, held = out.flush()
        final = self._finish(seq, reason, text + rest, handed + held)
        if stop_token:  # not in the content, so not among its tokens; still a generated token
            final.stop_token, final.stop_token_logprobs = token, logprobs
        return [final]

    def _start_siblings(self, seq: Sequence) -> None:
        """At choice 0's first sample: its prompt's KV blocks are cached, the other choices start on them."""
        if seq.index == 0:
            for sib in reversed(self.siblings.pop(seq.request_id, [])):
                self.scheduler.add(sib, front=True)

    def _finish(self, seq: Sequence, reason: str, text: str,
                tokens: list[tuple[int, TokenLogprobs | None]]) -> RequestOutput:
        self.scheduler.finish(seq, reason)
        final = self._final(seq, text, tokens)
        self._forget_if_done(seq.request_id)
        return final

    def _delta(self, seq: Sequence, text: str, tokens: list[tuple[int, TokenLogprobs | None]]) -> RequestOutput:
        out = RequestOutput(seq.request_id, seq.index, text, [t for t, _ in tokens],
                            [lp for _, lp in tokens if lp is not None], None, len(seq.prompt), len(seq.output),
                            seq.num_cached_prompt)
        state = self.outputs[seq.seq_id]
        if state.prompt_logprobs_due:  # choice 0 scored the prompt before any choice's first output
            state.prompt_logprobs_due = False
            out.prompt_logprobs = self.requests[seq.request_id][0].prompt_logprobs
        return out

    def _final(self, seq: Sequence, text: str, tokens: list[tuple[int, TokenLogprobs | None]]) -> RequestOutput:
        out = self._delta(seq, text, tokens)
        out.finish_reason = seq.finish_reason
        out.scheduled_at = seq.scheduled_at
        return out

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.requests.get(request_id, [])
        if all(s.is_finished for s in seqs) and request_id not in self.siblings:
            for s in seqs:
                self.outputs.pop(s.seq_id, None)
                if self.guide is not None:
                    self.guide.release(s)
            self.requests.pop(request_id, None)

    # -- conveniences ------------------------------------------------------------------------------------------
    def fail_all(self, message: str, status: int = 500) -> list[RequestOutput]:
        """After a failed step: the outputs that step had made (requests it finished get their answer), then an
        error for every request still here; frees all blocks."""
        outs, self._unsent = self._unsent, []
        self._in_flight = None  # its requests get their errors below
        for request_id in list(self.requests):
            outs.extend(self._errors(request_id, message, status))
        return outs

    def _fail_request(self, seq: Sequence, e: BaseException) -> list[RequestOutput]:
        """End `seq`'s request with an error for what its step raised (`e`): the other requests go on."""
        fault = e if isinstance(e, GrammarFault) else None
        if fault is None:
            log.error("request %r failed in its step", seq.request_id, exc_info=e)
        else:
            log.warning("request %r failed: %r", seq.request_id, str(fault))
        message = str(fault) if fault is not None else "the request failed in its engine step"
        return self._errors(seq.request_id, message, fault.status if fault is not None else 500)

    def _errors(self, request_id: str, message: str, status: int) -> list[RequestOutput]:
        """Abort a request, its choices' last outputs carrying an error."""
        outs = self.abort(request_id)
        for out in outs:
            out.finish_reason, out.error, out.error_status = "error", message, status
        return outs

    # -- what the engine reports (between steps, on the thread that steps; `stats` from any thread) ---------------
    def stats(self) -> EngineStats:
        """The counters now. `/health` reads them from the event loop's thread while steps run: each is one read,
        and the held-back choices are counted over a copy of their dict's values, which a step may change."""
        b, s = self.blocks, self.scheduler
        # Choices 1..n-1 of a request wait apart (`siblings`) until choice 0 has its prompt's KV: they wait all the same
        held_back = sum(map(len, list(self.siblings.values())))
        return EngineStats(running=len(s.running), waiting=len(s.waiting) + held_back, free_blocks=b.num_free,
                           total_blocks=b.num_blocks, preemptions=s.num_preemptions,
                           prefix_hit_tokens=b.prefix_hit_tokens, prefix_query_tokens=b.prefix_query_tokens,
                           prefix_collisions=b.prefix_collisions, attention_kernel=self.runner.cache.backend.name)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.runner.cache.k.dtype

    def expert_counts(self) -> list[list[int]] | None:
        """[L][E] tokens routed to each expert of each layer since the engine started (None for a dense model)."""
        return self.expert_load.snapshot() if self.expert_load is not None else None

    def drain_step_tokens(self) -> list[int]:
        """The tokens each step computed since the last call, oldest first (at most the last `_MAX_PENDING_STEPS`)."""
        steps = self.step_tokens
        return [steps.popleft() for _ in range(len(steps))]

    def drain_shard_rounds(self) -> list[float]:
        """Host seconds of each layer's round to the expert shards since the last call (none without shards)."""
        return [t for executor in self._shard_executors() for t in executor.drain_round_times()]

    def probe_shards(self) -> list[float] | None:
        """Each shard's round trip for one token, timed alone (None without shards). Delays the next step: call
        while idle. Raises `UnavailableError` when a shard cannot be reached."""
        executors = self._shard_executors()
        if not executors:
            return None
        weight, mc = self.model.lm_head.weight, self.model.config
        token = torch.zeros(1, mc.hidden_size, dtype=weight.dtype, device=weight.device)
        return executors[0].probe(token, mc.experts_per_token)

    def _shard_executors(self) -> list[ExpertParallelExecutor]:
        """The model's distinct executors whose experts live on shards."""
        found: dict[int, ExpertParallelExecutor] = {}
        for moe in self.model.moe_layers():
            if isinstance(moe.executor, ExpertParallelExecutor):
                found.setdefault(id(moe.executor), moe.executor)
        return list(found.values())


def _step_cost(config: EngineConfig, runner: ModelRunner, num_blocks: int) -> StepCost:
    if config.step_cost == "measured":
        return measure_step_cost(runner, num_blocks, config.max_num_batched_tokens)
    if config.step_cost == "flops":
        return StepCost.for_model(runner.model.config)
    raise ValueError(f"unknown step_cost {config.step_cost!r}: choose flops or measured")


def _prefill_budget_beside_decodes(config: EngineConfig, device: torch.device) -> int | None:
    if config.prefill_budget_beside_decodes is not None:
        return config.prefill_budget_beside_decodes
    return CPU_PREFILL_BUDGET_BESIDE_DECODES if device.type == "cpu" else None


def _num_blocks(config: EngineConfig, block_bytes: int, device: torch.device) -> int:
    budget = config.kv_cache_bytes
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * config.gpu_memory_utilization)
        else:
            budget = 2**30
    num = budget // block_bytes  # (the cache adds one block of scratch for padding rows' writes)
    if num < 1:
        raise ValueError(f"a KV-cache budget of {budget} bytes holds no block of {block_bytes} bytes")
    return num
