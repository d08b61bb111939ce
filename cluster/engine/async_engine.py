"""The async front: requests become async iterators of deltas; the step loop runs on its own thread.

HTTP handlers call `add_request` / `abort` from the event loop; the engine thread drains those commands between
steps, so the engine itself is only ever touched by one thread and the event loop never waits for a forward.

Admission is decided here, on the caller's side, from the streams this front holds (one per request, counted by
its choices): past `max_num_seqs` running plus `max_waiting` waiting sequences a new request is refused at once
(`OverloadedError`, 429) instead of queueing without bound. Asking the engine thread would wait for a step.

The engine is built on that thread too (from a factory), and any other torch work of the process belongs there
(`call`): libgomp shortens its workers' spin-wait once more OpenMP pools exist than cores, and every small parallel
op then pays a futex wake-up (benchmarks/RESULTS.md, "Figures behind design comments").
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol

from cluster.engine.engine import LLMEngine
from cluster.engine.grammar_paths import is_failure
from cluster.engine.outputs import OverloadedError, RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.parallel.dispatch import UnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Stream:
    loop: asyncio.AbstractEventLoop  # the caller's: outputs are put on `queue` from the engine thread through it
    queue: asyncio.Queue
    n: int  # sequences (choices) the request occupies in the engine


class Lockstep(Protocol):
    """Engines that step together (`cluster.engine.data_parallel`): each loop steps while any of them has work."""

    idle_poll_s: float  # how often idle engines ask each other again

    @property
    def connected(self) -> bool:
        ...

    def any_work(self) -> bool:
        """Every engine calls it in turn; raises `UnavailableError` when they cannot agree (not connected)."""
        ...

    def disconnect(self, reason: str) -> None:
        """Leave the group after a failed step (the others' next collective fails too, instead of pairing with a
        different one)."""
        ...


class AsyncEngine:
    def __init__(self, factory: Callable[[], LLMEngine], lockstep: Callable[[LLMEngine], Lockstep] | None = None):
        """Builds the engine with `factory()` on the engine thread; raises what the factory raised. With `lockstep`
        (made from the engine on that thread) the loop steps while any engine of its group has work, not only this
        one."""
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._admission = threading.Lock()  # the check and the act of admitting; callers may run on several loops
        self._in_flight = 0  # sequences of the requests in `_streams`: running + waiting in the engine
        self._wake = threading.Event()
        self._stopped = False
        built: Future = Future()
        self.lockstep: Lockstep | None = None
        self.stepping_since: float | None = None  # monotonic time the step now running began; None between steps
        self._thread = threading.Thread(target=self._run, args=(factory, lockstep, built), name="engine-loop",
                                        daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()
        # Sequences that may wait beyond the running batch before a request is refused: the engine's setting,
        # changeable while it runs (the AttentionRouter's user_config).
        self.max_waiting = self.engine.config.max_waiting

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run `fn(engine)` on the engine thread between two steps."""
        done: Future = Future()
        self._send(("call", fn, done))
        return done

    @property
    def running(self) -> bool:
        """The engine thread is up and not told to stop."""
        return not self._stopped and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Sequences of the requests admitted and not yet done (running + waiting)."""
        return self._in_flight

    async def add_request(self, request_id: str, prompt: list[int],
                          params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Validate now (raising `RequestError`) and admit (raising `OverloadedError`), then stream the request's
        deltas until every choice finishes.

        Leaving the iteration early (a client that disconnects) aborts the request.
        """
        self.engine.validate(prompt, params)
        if params.grammar is not None:  # compiled off the engine thread; the engine finds it in the guide's cache
            await asyncio.to_thread(self.engine.guide.compile, params.grammar, self.engine.context_len)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        self._admit(request_id, stream)
        self._send(("add", request_id, prompt, params))
        return self._iterate(request_id, stream)

    def overloaded(self) -> OverloadedError | None:
        """The refusal a request arriving now would get whatever it asks, or None. A front may ask this before it
        parses and tokenizes a request, so that a flood is turned away cheaply; `add_request` decides again."""
        running, waiting = self.engine.config.max_num_seqs, self.max_waiting
        if self._in_flight < running + waiting:
            return None
        return OverloadedError(f"the server is at capacity: {self._in_flight} sequences are in flight "
                               f"({running} run at once and at most {waiting} may wait); retry later")

    def _admit(self, request_id: str, stream: _Stream) -> None:
        with self._admission:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            refusal = self.overloaded()
            if refusal is not None:
                raise refusal
            self._streams[request_id] = stream
            self._in_flight += stream.n

    def _release(self, request_id: str) -> None:
        with self._admission:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._in_flight -= stream.n

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        done = 0
        try:
            while done < stream.n:
                out: RequestOutput = await stream.queue.get()
                done += out.finished
                yield out
        finally:
            self._release(request_id)
            if done < stream.n:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the loop; requests still running end with a 503 error."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self, factory: Callable[[], LLMEngine], lockstep: Callable[[LLMEngine], Lockstep] | None,
             built: Future) -> None:
        try:
            self.engine = factory()
            self.lockstep = lockstep(self.engine) if lockstep is not None else None
        except BaseException as e:
            built.set_exception(e)
            return
        built.set_result(self.engine)
        self._loop()

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_commands()
            if not self._has_work():
                self._wake.wait(self._idle_poll())
                self._wake.clear()
                continue
            self.stepping_since = time.monotonic()
            try:
                outs = self.engine.step()
            except UnavailableError as e:  # an expert shard went away: its owner recovers it
                log.warning("engine step failed: %s", e)
                self._leave(str(e))
                outs = self.engine.fail_all(str(e), status=503)
            except BaseException as e:  # a failed step fails its requests (a panic too), never the loop
                if not is_failure(e):
                    raise
                log.exception("engine step failed")
                self._leave(f"engine step failed: {e}")
                outs = self.engine.fail_all(f"engine step failed: {e}")
            finally:
                self.stepping_since = None
            self._publish(outs)
        self._leave("the engine is shutting down")  # its group's other engines stop waiting for it at once
        self._drain_commands()
        self._publish(self.engine.fail_all("the engine is shutting down", status=503))

    def _has_work(self) -> bool:
        if self.lockstep is None:
            return self.engine.has_work()
        try:
            return self.lockstep.any_work()
        except BaseException as e:  # cut off from the group: what this engine holds fails now, and new work too
            if not is_failure(e):
                raise
            if not isinstance(e, UnavailableError):
                log.exception("the engines could not agree on a step")
            self._leave(str(e))
            self._publish(self.engine.fail_all(str(e), status=503))
            return False

    def _leave(self, reason: str) -> None:
        """A step that failed on this engine alone would leave its group out of step: leave it (no-op alone)."""
        if self.lockstep is not None:
            self.lockstep.disconnect(reason)

    def _idle_poll(self) -> float | None:
        """How long to sleep with nothing to do: until a command comes, or (stepping with others) the next ask."""
        lockstep = self.lockstep
        return lockstep.idle_poll_s if lockstep is not None and lockstep.connected else None

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params = command
                try:
                    self.engine.add_request(request_id, prompt, params)
                except BaseException as e:  # a panic in the grammar engine too: refused, the loop goes on
                    if not is_failure(e):
                        raise
                    refusal = e if isinstance(e, Exception) else RuntimeError("the grammar engine failed")
                    self._publish(RequestOutput.refused(request_id, params.n, refusal))
            elif command[0] == "call":
                _, fn, done = command
                try:
                    done.set_result(fn(self.engine))
                except BaseException as e:
                    done.set_exception(e)
            else:
                self._publish(self.engine.abort(command[1]))

    def _publish(self, outs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their callers: one hand-off per event loop, not one per output (each wakes the
        loop through its self-pipe)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                for request_id in dict.fromkeys(out.request_id for _, out in deliveries):
                    self._release(request_id)
                    self.abort(request_id)


def _deliver(deliveries: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """On the caller's event loop: each output onto its stream's queue, in the engine's order."""
    for stream_queue, out in deliveries:
        stream_queue.put_nowait(out)
