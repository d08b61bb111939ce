"""A data-parallel serving unit, seen from its AttentionRouter replica: R attention ranks (`AttentionRank` actors,
one per GPU, each with its own requests, KV cache and shard of the experts), started in the replica's placement
group, joined into one group, given requests, watched and brought back.

Why the replica leads rather than each rank being a Serve replica of its own: a unit comes and goes whole (Serve's
autoscaling, a drained node, an upgrade), its ranks must share one STRICT_PACK placement group, and a lost rank
stops its peers' steps. Serve reserves and scales one replica per unit; the replica spreads its requests over the
ranks (to the rank caching the longest prefix of the prompt unless that one is far busier, else the one with the
fewest sequences in flight) and forwards each rank's output batches as they come.

When a rank dies or stops answering, its peers' exchanges fail at once (or at the group's timeout, `step_timeout_s`)
and their requests get 503 errors; the killed rank's streams end with an error event here; new requests get 503
while the unit is "recovering". The supervisor kills a rank that does not answer, waits for Ray to bring every
rank back (a restarted one reloads its weights), and forms the group again on a fresh port. A unit not back within
`recovery_timeout_s` is "failed" and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import threading
import time
from typing import AsyncIterator

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.health import Health
from cluster.parallel.all_to_all import largest_message_bytes
from cluster.parallel.rank_group import RankGroupSpec
from cluster.parallel.shm_channel import shm_directory
from cluster.parallel.shm_collectives import create_shm_collectives
from cluster.serve.attention_rank import AttentionRank
from cluster.serve.prefix_routing import PrefixTable, prompt_chain
from cluster.serve.resolved import ResolvedArgs
from cluster.serve.unit import UNIT_ENV

log = logging.getLogger(__name__)

_PING_PERIOD_S = 0.25  # how often the supervisor asks every rank (a lost one refuses requests within a second)
_PING_TIMEOUT_S = 10.0  # a rank that answers no ping this long is hung: killed, and Ray restarts it
_RETRY_S = 1.0
_STEP_SLACK_S = 10.0  # beyond the step timeout (every collective's bound), before a rank in one step counts as hung
_PREFIX_BLOCKS = 128  # prompt blocks hashed for routing (as the unit-level router)
_PREFIX_ENTRIES = 1 << 16
_MIN_MATCH = 0.25  # of the prompt's hashed blocks a rank must hold to be preferred
_STATS_TIMEOUT_S = 0.2  # /health waits this long for each rank's engine stats (a probe gives up at 0.4 s)


class _UnitLost(RuntimeError):
    """The unit began recovering while a stream waited for its rank."""


class _LossAlarm:
    """An asyncio.Event per event loop that streams wait on, set from the supervisor's thread while the unit is not
    ok (and cleared once it is again)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}
        self._raised = False

    def event(self) -> asyncio.Event:
        """The calling event loop's."""
        loop = asyncio.get_running_loop()
        with self._lock:
            event = self._events.get(loop)
            if event is None:
                event = self._events[loop] = asyncio.Event()
                if self._raised:
                    event.set()
            return event

    def raise_(self, raised: bool) -> None:
        with self._lock:
            self._raised = raised
            for loop, event in list(self._events.items()):
                try:
                    loop.call_soon_threadsafe(event.set if raised else event.clear)
                except RuntimeError:  # that loop is closed
                    del self._events[loop]


class DataParallelUnit:
    def __init__(self, resolved: ResolvedArgs):
        self.resolved = resolved
        self.args = resolved.args
        self.num_ranks = resolved.layout.attention_ranks
        self.state, self.detail = "starting", "loading the attention ranks"
        self._lost = _LossAlarm()  # rung when the unit stops being ok: streams waiting on a rank give up at once
        self.recoveries = 0
        self.in_flight = [0] * self.num_ranks  # sequences sent to each rank and not yet ended
        self.max_waiting: int | None = None  # a live setting applied since start (None: the ranks' own)
        engine = resolved.engine
        self.prefixes: PrefixTable[int] | None = PrefixTable(_PREFIX_ENTRIES) if engine.enable_prefix_caching else None
        self._imbalance = max(1, engine.max_num_seqs // 2)  # sequences beyond the least loaded rank a prefix may add
        self._turn = itertools.count()  # breaks ties between equally loaded ranks
        self.actors = [self._start_rank(r) for r in range(self.num_ranks)]
        self._wait_loaded()
        self._connect()
        self.state, self.detail = "ok", ""
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._watch, name="rank-supervisor", daemon=True)
        self._supervisor.start()

    # -- start-up ----------------------------------------------------------------------------------------------
    def _start_rank(self, rank: int):
        cuda = self.resolved.device == "cuda"
        options = {"num_cpus": self.args.replica_cpus, "num_gpus": 1 if cuda else 0, "max_restarts": -1,
                   "max_concurrency": 10_000, "runtime_env": {"env_vars": UNIT_ENV}}
        pg = get_current_placement_group()
        if pg is not None:  # bundle 0 is the replica's (`UnitLayout.bundles`)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank + 1)
        threads = None if cuda else max(1, (os.cpu_count() or 1) // self.num_ranks)
        return ray.remote(AttentionRank).options(**options).remote(self.resolved, rank, threads)

    def _wait_loaded(self) -> None:
        t0 = time.perf_counter()
        infos = ray.get([a.info.remote() for a in self.actors])
        self.pids = [info["pid"] for info in infos]  # each rank's process, as last seen
        # Whether the ranks share this node, where a silent rank's process can be told apart: hung or gone.
        here = ray.get_runtime_context().get_node_id()
        self.local = all(n == here for n in ray.get([a.node_id.remote() for a in self.actors]))
        for info in infos:
            log.info("attention rank %d: experts %s, %.1f MB, loaded in %ss (pid %s)", info["rank"], info["experts"],
                     info["bytes"] / 1e6, info["load_s"], info["pid"])
        log.info("%d attention ranks ready in %.1fs", self.num_ranks, time.perf_counter() - t0)

    def _connect(self) -> None:
        """Every rank joins a fresh group (rank 0 hosts its store); raises if one does not within the timeout."""
        address, port = ray.get(self.actors[0].meeting_point.remote(), timeout=_PING_TIMEOUT_S)
        backend = self.backend = self._backend()
        spec = RankGroupSpec(address, port, self.num_ranks, backend, timeout_s=self.args.step_timeout_s,
                             path=shm_directory() if backend == "shm" else "", slot_bytes=self._slot_bytes())
        try:
            if backend == "shm":
                create_shm_collectives(spec.path, self.num_ranks, spec.slot_bytes)
            ray.get([a.connect.remote(spec) for a in self.actors], timeout=spec.connect_timeout_s)
        finally:
            if spec.path:  # the ranks removed the names once they all held them; not if one never came
                shutil.rmtree(spec.path, ignore_errors=True)

    def _backend(self) -> str:
        """The `channel` setting; `auto`: NCCL on GPUs, shared memory when every rank is on this machine, else gloo."""
        channel, cuda = self.args.channel, self.resolved.device == "cuda"  # which fits the device: `resolve`
        if channel == "shm" and not self.local:
            raise ValueError("channel=shm needs every attention rank on the replica's machine")
        if channel != "auto":
            return channel
        return "nccl" if cuda else "shm" if self.local else "gloo"

    def _slot_bytes(self) -> int:
        """The largest message of one shared-memory collective."""
        c, r = self.resolved.config, self.resolved
        tokens = max(r.engine.max_num_batched_tokens, r.engine.max_num_seqs)  # a step's most (padded decodes too)
        return largest_message_bytes(tokens, c.experts_per_token, c.hidden_size, r.dtype)

    # -- requests ----------------------------------------------------------------------------------------------
    def pick(self, prompt: list[int], params: SamplingParams) -> int:
        """The rank that last took the longest prefix of `prompt` (each rank has its own prefix cache; keyed as the
        engine keys it, salt included: `cluster.serve.prefix_routing`), unless it carries more than half a batch
        beyond the least loaded rank or prefix caching is off; else the rank with the fewest sequences in flight
        (ties taken in turn). The table learns the choice."""
        turn = next(self._turn)
        least = min(range(self.num_ranks), key=lambda r: (self.in_flight[r], (r - turn) % self.num_ranks))
        if self.prefixes is None:
            return least
        chain = prompt_chain(prompt, params.cache_salt, self.resolved.engine.block_size, _PREFIX_BLOCKS)
        depth, holder = self.prefixes.longest_match(chain, range(self.num_ranks))
        balanced = holder is not None and self.in_flight[holder] - self.in_flight[least] <= self._imbalance
        rank = holder if balanced and depth >= _MIN_MATCH * len(chain) else least
        self.prefixes.record(chain, rank)
        return rank

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams, stream: bool,
                       interval_s: float) -> AsyncIterator[list[RequestOutput]]:
        """The request's output batches from the rank that runs it. A rank lost meanwhile ends each unfinished
        choice with a 503 error as soon as the unit knows (a dead actor's own error takes Ray a second or more)."""
        rank = self.pick(prompt, params)
        batches = self.actors[rank].generate.remote(request_id, prompt, params, stream, interval_s)
        self.in_flight[rank] += params.n
        finished: set[int] = set()
        try:
            while (ref := await self._next(batches)) is not None:
                batch: list[RequestOutput] = await ref
                finished.update(out.index for out in batch if out.finished)
                yield batch
        except (ray.exceptions.RayError, _UnitLost) as e:
            log.warning("request %s lost attention rank %d: %s", request_id, rank, e)
            errors = RequestOutput.errors(request_id, params.n, f"the serving unit lost an attention rank ({e}); "
                                                                "retry", 503)
            unfinished = [out for out in errors if out.index not in finished]
            if unfinished:
                yield unfinished
        finally:
            self.in_flight[rank] -= params.n
            if len(finished) < params.n:  # the client left (or the rank is gone): stop the request there
                ray.cancel(batches)

    async def _next(self, batches) -> ray.ObjectRef | None:
        """The stream's next batch's reference (None at its end), unless the unit starts recovering first (the
        supervisor rings every event loop's alarm: no stream polls)."""
        lost = self._lost.event()
        ahead = asyncio.ensure_future(anext(batches, None))
        try:
            while True:
                if self.state != "ok":
                    raise _UnitLost(self.detail)
                alarm = asyncio.ensure_future(lost.wait())
                await asyncio.wait({ahead, alarm}, return_when=asyncio.FIRST_COMPLETED)
                alarm.cancel()
                if ahead.done():
                    return ahead.result()
                await asyncio.sleep(0)  # the alarm rang: lost, or a recovery's end not yet cleared it (queued here)
        finally:
            if not ahead.done():
                ahead.cancel()

    def set_max_waiting(self, max_waiting: int) -> None:
        """A live setting for every rank; kept, and sent again to ranks that come back after a loss."""
        self.max_waiting = max_waiting
        try:
            self._send_settings()
        except Exception as e:  # a rank is being replaced: recovery sends it
            log.warning("max_waiting reaches the attention ranks once they are back: %s", e)

    def _send_settings(self) -> None:
        if self.max_waiting is not None:
            ray.get([a.set_max_waiting.remote(self.max_waiting) for a in self.actors], timeout=_PING_TIMEOUT_S)

    # -- health --------------------------------------------------------------------------------------------------
    def health(self) -> Health:
        return Health(self.state, self.detail, {"attention_ranks": self.num_ranks, "recoveries": self.recoveries,
                                                "rank_in_flight": list(self.in_flight)})

    async def stats(self) -> dict:
        """The ranks' engine stats, summed where they count (running, waiting, in flight), asked in parallel; a rank
        that does not answer within `_STATS_TIMEOUT_S` (busy, or being replaced) shows as None and counts nothing."""
        async def one(actor) -> dict | None:
            try:
                return await asyncio.wait_for(actor.stats.remote(), _STATS_TIMEOUT_S)
            except (asyncio.TimeoutError, ray.exceptions.RayError):
                return None

        every = await asyncio.gather(*(one(a) for a in self.actors))
        answered = [s for s in every if s is not None]
        summed = {k: sum(s[k] for s in answered) for k in (answered[0] if answered else {})
                  if all(type(s.get(k)) is int for s in answered)}
        return {**summed, "ranks": every}

    def shard_info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors], timeout=_PING_TIMEOUT_S)

    def close(self) -> None:
        self._stop.set()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    # -- supervision ---------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Ping every rank each period (a rank's next ping goes once it answered the last) until one died, says its
        group failed, or leaves a ping unanswered for `_PING_TIMEOUT_S`; then recover."""
        outstanding: dict[int, tuple[ray.ObjectRef, float]] = {}  # rank -> (its ping in flight, when sent)
        while self.state != "failed" and not self._stop.is_set():  # failed: Serve replaces the replica
            started = time.monotonic()
            for rank, actor in enumerate(self.actors):
                if rank not in outstanding:
                    outstanding[rank] = actor.ping.remote(), started
            lost = self._answers(outstanding)
            if lost is not None:
                self._recover(*lost)
                outstanding.clear()  # pings to the ranks as they were
            else:
                self._stop.wait(max(0.0, _PING_PERIOD_S - (time.monotonic() - started)))

    def _answers(self, outstanding: dict[int, tuple[ray.ObjectRef, float]]) -> tuple[str, tuple[int, ...]] | None:
        """Wait up to a period for the pings in flight; (why, the ranks that hung) when the unit must recover."""
        refs = {ref: rank for rank, (ref, _) in outstanding.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=_PING_PERIOD_S)
        for ref in ready:
            rank = refs[ref]
            del outstanding[rank]
            try:
                pid, connected, why, stepping_s = ray.get(ref)
            except ray.exceptions.RayError as e:
                return f"attention rank {rank} died ({type(e).__name__})", ()
            self.pids[rank] = pid
            if stepping_s > self.args.step_timeout_s + _STEP_SLACK_S:  # its engine thread is stuck, or ended
                return f"attention rank {rank}'s engine has been stuck for {stepping_s:.0f}s", (rank,)
            if not connected:
                return f"attention rank {rank} is cut off: {why}", ()
        now = time.monotonic()
        hung = tuple(sorted(r for r, (_, sent) in outstanding.items() if now - sent > _PING_TIMEOUT_S))
        if hung:
            return f"attention rank(s) {_ids(hung)} answered no ping for {_PING_TIMEOUT_S:g}s", hung
        return None

    def _recover(self, reason: str, hung: tuple[int, ...]) -> None:
        self.state, self.detail = "recovering", f"{reason}; forming the attention ranks' group again"
        self._lost.raise_(True)
        log.warning("serving unit recovering: %s", reason)
        deadline = time.monotonic() + self.args.recovery_timeout_s
        before = list(self.pids)
        if self.backend == "nccl":  # a rank may be stuck inside NCCL on an aborted peer: restart them all
            hung = tuple(range(self.num_ranks))
        self._kill(hung)
        while not self._stop.is_set():
            try:
                hung = self._hung_ranks()  # raises while a rank is restarting (and loading)
                if hung:
                    self._kill(hung)
                    raise TimeoutError(f"attention rank(s) {_ids(hung)} killed for hanging; waiting for them")
                self._connect()  # every rank answers: a group can form
                self._send_settings()
            except Exception as e:  # not back yet, or the group did not form: try again until the deadline
                if time.monotonic() > deadline:
                    self.state, self.detail = "failed", f"{reason}; not back after {self.args.recovery_timeout_s:.0f}s"
                    log.error("serving unit failed: %s (%s)", self.detail, e)
                    return
                time.sleep(_RETRY_S)
                continue
            if self.prefixes is not None:  # a rank in a new process has an empty prefix cache
                self.prefixes.forget({r for r in range(self.num_ranks) if self.pids[r] != before[r]})
            self.recoveries += 1
            self._lost.raise_(False)  # queued on each loop before the state says ok: a stream that sees ok waits
            self.state, self.detail = "ok", ""
            log.warning("serving unit recovered (%d recoveries)", self.recoveries)
            return

    def _hung_ranks(self) -> tuple[int, ...]:
        """Ping every rank; raises while one is not back (restarting, loading); -> the ranks whose process is still
        the one that stopped answering (hung, as a stopped process is: a dead one's Ray restarts in a new one)."""
        pings = [a.ping.remote() for a in self.actors]
        ready, pending = ray.wait(pings, num_returns=len(pings), timeout=_PING_TIMEOUT_S)
        for ref in ready:
            pid, _, _, _ = ray.get(ref)  # a RayError: that rank is restarting
            self.pids[pings.index(ref)] = pid
        silent = [pings.index(ref) for ref in pending]
        hung = tuple(r for r in silent if self.local and _alive(self.pids[r]))
        if len(hung) < len(silent):
            raise TimeoutError(f"attention rank(s) {_ids(tuple(silent))} not back yet")
        return hung

    def _kill(self, ranks: tuple[int, ...]) -> None:
        for rank in ranks:
            log.warning("attention rank %d (pid %s) stopped answering: killed, Ray restarts it", rank, self.pids[rank])
            ray.kill(self.actors[rank], no_restart=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        pass
    return True


def _ids(ranks: tuple[int, ...]) -> str:
    return ", ".join(map(str, ranks))
