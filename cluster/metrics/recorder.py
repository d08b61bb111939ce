"""Request-level metrics, recorded in the process that runs the engine as each request's outputs pass through its
backend (`cluster.serve.engine_backend.EngineBackend`, the same in both modes).

Per request and per finished choice the series are called directly. Per token only a clock read, an append to the
choice's own gaps and a locked integer add happen. The time to first token is recorded at once (so its alert
fires while choices still run); a choice's other latencies wait for its end: one that ends in an error records
none of them (only `request_success{finished_reason="error"}`), so failures never skew them. Its gaps then go to
a queue that the sampler thread drains into the inter-token histogram, with the generation counter (`flush`), off
the event loop's path.

Times are `time.monotonic()` in this process: the arrival when the backend got the request, a choice's first step
from the engine (`RequestOutput.scheduled_at`), its tokens as their outputs arrive here.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import deque

from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.metrics import names as mn
from cluster.metrics.sink import Series, Sink

# Token gaps waiting for the sampler: a stalled sampler drops the oldest (histogram samples, never counts).
_MAX_PENDING_GAPS = 1 << 16


class RequestMetrics:
    def __init__(self, sink: Sink, model_name: str):
        self.sink = sink
        self.model_name = model_name
        s = lambda spec: sink.series(spec, model_name)  # noqa: E731
        self.prompt_tokens, self.generation_tokens = s(mn.PROMPT_TOKENS), s(mn.GENERATION_TOKENS)
        self.request_prompt_tokens, self.request_generation_tokens = (s(mn.REQUEST_PROMPT_TOKENS),
                                                                      s(mn.REQUEST_GENERATION_TOKENS))
        self.params_n, self.params_max_tokens = s(mn.REQUEST_PARAMS_N), s(mn.REQUEST_PARAMS_MAX_TOKENS)
        self.ttft, self.itl, self.tpot, self.e2e = s(mn.TTFT), s(mn.ITL), s(mn.TPOT), s(mn.E2E)
        self.queue, self.inference, self.prefill, self.decode = (s(mn.QUEUE), s(mn.INFERENCE), s(mn.PREFILL),
                                                                 s(mn.DECODE))
        self._success: dict[str, Series] = {r: sink.series(mn.REQUEST_SUCCESS, model_name, r)
                                            for r in mn.FINISH_REASONS}
        self._refused: dict[str, Series] = {status: sink.series(mn.REQUESTS_REFUSED, model_name, status)
                                            for status in mn.REFUSAL_STATUSES}
        for counter in (self.prompt_tokens, self.generation_tokens, *self._success.values(), *self._refused.values()):
            counter.inc(0)  # exported from 0
        self._gaps: deque[float] = deque(maxlen=_MAX_PENDING_GAPS)
        self._lock = threading.Lock()
        self._generated = 0  # tokens seen so far; `flush` adds what it did not add yet
        self._flushed = 0

    def request(self, prompt_tokens: int, params: SamplingParams, arrival: float) -> RequestTimer:
        """An admitted request's timer (`arrival`: time.monotonic() when the backend got it)."""
        self.params_n.observe(params.n)
        self.params_max_tokens.observe(params.max_tokens)
        return RequestTimer(self, prompt_tokens, params.n, arrival)

    def flush(self) -> None:
        """Record the token gaps and counts gathered since the last flush (the sampler's thread)."""
        gaps = self._gaps
        while gaps:
            self.itl.observe(gaps.popleft())
        with self._lock:
            new, self._flushed = self._generated - self._flushed, self._generated
        self.generation_tokens.inc(new)

    def refused(self, status: int) -> None:
        """A request refused before it ran, with this HTTP status."""
        key = str(status)
        if key not in self._refused:
            self._refused[key] = self.sink.series(mn.REQUESTS_REFUSED, self.model_name, key)
        self._refused[key].inc()

    def success(self, reason: str) -> Series:
        if reason not in self._success:
            self._success[reason] = self.sink.series(mn.REQUEST_SUCCESS, self.model_name, reason)
        return self._success[reason]

    def _add_generated(self, n: int) -> None:
        with self._lock:
            self._generated += n


class RequestTimer:
    """One request's choices: their token counts and times, recorded as its outputs arrive (`output`) and, for
    choices that never finished (a client that went away), as aborted at `close`."""

    __slots__ = ("metrics", "prompt_tokens", "arrival", "prefilled", "tokens", "first", "last", "gaps", "done")

    def __init__(self, metrics: RequestMetrics, prompt_tokens: int, n: int, arrival: float):
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.arrival = arrival
        self.prefilled = False  # the prompt counted (at the request's first token)
        self.tokens = [0] * n  # completion tokens of each choice so far
        self.first: list[float | None] = [None] * n  # when each choice's first token arrived
        self.last = [0.0] * n  # when its latest token arrived
        self.gaps = [array("d") for _ in range(n)]  # seconds between its tokens, recorded when it ends
        self.done = [False] * n

    def output(self, out: RequestOutput) -> None:
        i = out.index
        if self.done[i]:
            return
        if out.error is not None or out.finish_reason == "error":
            self._fail(i)
            return
        new = out.completion_tokens - self.tokens[i]
        if new > 0:
            now = time.monotonic()
            if self.first[i] is None:
                self._first_token(i, now)
            else:
                self.gaps[i].append(now - self.last[i])
            self.metrics._add_generated(new)
            self.tokens[i], self.last[i] = out.completion_tokens, now
        if out.finish_reason is not None:
            self._finish(i, out.finish_reason, out.scheduled_at)

    def close(self) -> None:
        """The request's stream ended: choices without a finish were aborted."""
        for i, done in enumerate(self.done):
            if not done:
                self._finish(i, "abort", None)

    def _first_token(self, i: int, now: float) -> None:
        """At once, so a high time to first token alerts while the choice still runs (a first token means the
        choice started; a failure after it does not make this time wrong)."""
        self.first[i] = now
        self.metrics.ttft.observe(now - self.arrival)
        if not self.prefilled:
            self.prefilled = True
            m = self.metrics
            m.prompt_tokens.inc(self.prompt_tokens)
            m.request_prompt_tokens.observe(self.prompt_tokens)

    def _fail(self, i: int) -> None:
        self.done[i] = True
        self.gaps[i] = array("d")
        self.metrics.success("error").inc()

    def _finish(self, i: int, reason: str, scheduled_at: float | None) -> None:
        m, now, first, tokens = self.metrics, time.monotonic(), self.first[i], self.tokens[i]
        self.done[i] = True
        m.success(reason).inc()
        m.e2e.observe(now - self.arrival)
        m.request_generation_tokens.observe(tokens)
        if scheduled_at is not None:
            m.queue.observe(max(0.0, scheduled_at - self.arrival))
            m.inference.observe(max(0.0, now - scheduled_at))
            if first is not None:
                m.prefill.observe(max(0.0, first - scheduled_at))
        if first is not None:
            m._gaps.extend(self.gaps[i])
            self.gaps[i] = array("d")
            m.decode.observe(now - first)
            if tokens > 1:
                m.tpot.observe((self.last[i] - first) / (tokens - 1))
