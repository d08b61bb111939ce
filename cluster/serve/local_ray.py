"""`moe-cluster serve`: start Ray on this machine (or join the cluster at RAY_ADDRESS) and run the Serve app until
SIGTERM or SIGINT.

A signal drains every Ingress replica (`Ingress.begin_drain`: 503 for new requests, `shutdown_grace_s` for those
in flight, then an error event and [DONE] for the rest), shuts Serve down and, when this process started the local
Ray, Ray too, removing its temporary directory; then the process exits 0. A second signal skips the drain, and a
signal during start-up stops it at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time

from cluster.serve.args import ServeArgs
from cluster.serve.resolved import ResolvedArgs, check_planned, resolve

APP_NAME = "moe-cluster"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_DRAIN_ROUNDS = 50  # of quick calls: Serve spreads them as its view of the replicas' queues catches up
_CALL_TIMEOUT_S = 30.0
_DRAIN_SLACK_S = 30.0  # beyond the grace: for the cut requests to unwind

log = logging.getLogger(__name__)


def run_on_ray(args: ServeArgs, host: str, port: int) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster needs no token file
    import ray
    from ray import serve

    from cluster.serve.app import decide, serve_app

    # A cluster this process starts keeps its sockets, logs and spill files here, removed when it stops (short:
    # Ray's socket paths must fit 107 characters). With RAY_ADDRESS set, the process joins that cluster instead.
    own_ray = "RAY_ADDRESS" not in os.environ
    temp_dir = tempfile.mkdtemp(prefix="moe-ray-", dir="/tmp") if own_ray else None
    try:
        ray.init(log_to_driver=True, _temp_dir=temp_dir)
        stop = _StopSignals()  # after ray.init, which sets a SIGTERM handler of its own (exit at once)
        try:
            serve.start(http_options={"host": host, "port": port})
            args = decide(args, own_ray)
            resolved = resolve(args)  # here too: a bad checkpoint or setting fails before any replica starts
            args = _fit_to_checkpoint(args, resolved)
            check_planned(args, resolved)
            serve.run(serve_app(args), name=APP_NAME, route_prefix="/")
            stop.serving = True
            log.info("serving %s on http://%s:%d/v1 (%d expert shards on Ray); SIGTERM or Ctrl-C stops",
                     resolved.model_name, host, port, resolved.num_shards)
            signum = stop.wait()
            log.info("%s: draining for up to %gs", signal.Signals(signum).name, args.shutdown_grace_s)
            _drain(serve, args.ingress_replicas, args.shutdown_grace_s, stop)
        except KeyboardInterrupt:  # a signal during start-up: nothing to drain
            log.info("stopping during start-up")
        finally:
            serve.shutdown()
            stop.restore()
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    log.info("stopped")


def _fit_to_checkpoint(args: ServeArgs, resolved: ResolvedArgs) -> ServeArgs:
    """A dense checkpoint has no experts to shard: with `shards` left at its default, reserve none (here the
    checkpoint is readable; a Serve config on a cluster says `shards: 0` itself)."""
    if "shards" in args.model_fields_set or resolved.num_shards == args.shards:
        return args
    return args.model_copy(update={"shards": 0})


def _drain(serve, replicas: int, grace_s: float, stop: "_StopSignals") -> None:
    """Drain every Ingress replica, unless a second signal comes first (the drain is then abandoned)."""
    ingress = serve.get_deployment_handle("Ingress", APP_NAME)
    done = threading.Event()

    def drain_all() -> None:
        try:
            _drain_all(ingress, replicas, grace_s)
        finally:
            done.set()

    threading.Thread(target=drain_all, daemon=True).start()
    while not done.wait(0.1):
        if stop.count > 1:
            log.warning("second signal: stopping without draining")
            return


def _drain_all(ingress, replicas: int, grace_s: float) -> None:
    """A handle call reaches one replica, Serve's choice: so the quick `begin_drain` goes out two a replica not yet
    asked, in rounds, until every replica id has answered (all stop admitting within those rounds); then `drained`
    the same way, until each one's drain has ended."""
    began: dict[str, int] = {}  # replica id -> the requests it had in flight
    if not _rounds(lambda: ingress.begin_drain.remote(grace_s), replicas, began):
        return
    log.info("every Ingress replica (%d) stopped admitting", len(began))
    for replica, in_flight in began.items():
        log.info("draining Ingress replica %s (%d requests in flight)", replica, in_flight)
    done: dict[str, bool] = {}
    deadline = time.monotonic() + grace_s + _DRAIN_SLACK_S
    while time.monotonic() < deadline:
        if not _rounds(lambda: ingress.drained.remote(), replicas, done):
            return
        if all(done.values()):
            return
        done = {replica: ended for replica, ended in done.items() if ended}  # ask again about the others
        time.sleep(0.1)
    log.warning("the Ingress replicas did not finish draining in time")


def _rounds(ask, replicas: int, answers: dict) -> bool:
    """Send `ask()` two a replica not yet in `answers`, in rounds, adding each (replica id, value) answer, until
    `replicas` ids have answered or the rounds run out -> False if they did not, or the app is gone."""
    for _ in range(_DRAIN_ROUNDS):
        try:
            responses = [ask() for _ in range(2 * (replicas - len(answers)))]
        except Exception as e:  # the app is gone: nothing left to drain
            log.warning("draining the Ingress failed: %s", e)
            return False
        for response in responses:
            try:
                replica, value = response.result(timeout_s=_CALL_TIMEOUT_S)
            except Exception as e:  # this replica is gone or stuck; the others still drain
                log.warning("draining an Ingress replica failed: %s", e)
                continue
            answers.setdefault(replica, value)
        if len(answers) >= replicas:
            return True
    log.warning("%d of %d Ingress replicas answered", len(answers), replicas)
    return False


class _StopSignals:
    """SIGTERM/SIGINT handlers: during start-up a signal interrupts it (KeyboardInterrupt); once `serving`, they
    count the signals, and `wait` blocks the main thread until the first."""

    def __init__(self):
        self.serving = False
        self.count = 0
        self.signum = 0
        self._event = threading.Event()
        self._previous = {s: signal.signal(s, self._handle) for s in _STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if not self.serving:
            raise KeyboardInterrupt
        self.count += 1
        self.signum = self.signum or signum
        self._event.set()

    def wait(self) -> int:
        while not self._event.wait(1.0):  # a timed wait, so the handler runs promptly
            pass
        return self.signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
