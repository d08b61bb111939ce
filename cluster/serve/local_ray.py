"""`moe-cluster serve`: start Ray on this machine (or join the cluster at RAY_ADDRESS) and run the Serve app until
SIGTERM or SIGINT.

A signal drains every Ingress replica (`Ingress.drain`: 503 for new requests, `shutdown_grace_s` for those in
flight, then an error event and [DONE] for the rest), shuts Serve down and, when this process started the local Ray, Ray too,
removing its temporary directory; then the process exits 0. A second signal skips the drain, and a signal during
start-up stops it at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading

from cluster.serve.args import ServeArgs

APP_NAME = "moe-cluster"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_DRAIN_ROUNDS = 10


def run_on_ray(args: ServeArgs, host: str, port: int) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster needs no token file
    import ray
    from ray import serve

    from cluster.serve.app import decide_device, deployment_plan, serve_app

    # A cluster this process starts keeps its sockets, logs and spill files here, removed when it stops (short:
    # Ray's socket paths must fit 107 characters). With RAY_ADDRESS set, the process joins that cluster instead.
    own_ray = "RAY_ADDRESS" not in os.environ
    temp_dir = tempfile.mkdtemp(prefix="moe-ray-", dir="/tmp") if own_ray else None
    if own_ray and args.ingress_replicas is None:
        args = args.model_copy(update={"ingress_replicas": 1})  # one machine: a second Ingress would add nothing
    try:
        ray.init(log_to_driver=True, _temp_dir=temp_dir)
        stop = _StopSignals()  # after ray.init, which sets a SIGTERM handler of its own (exit at once)
        try:
            serve.start(http_options={"host": host, "port": port})
            args = decide_device(args)
            resolved = args.resolve()  # here too, so a bad checkpoint or setting fails before any replica starts
            serve.run(serve_app(args), name=APP_NAME, route_prefix="/")
            stop.serving = True
            print(f"serving {resolved.model_name} on http://{host}:{port}/v1 ({resolved.num_shards} expert shards "
                  f"on Ray); SIGTERM or Ctrl-C stops", file=sys.stderr, flush=True)
            signum = stop.wait()
            print(f"{signal.Signals(signum).name}: draining for up to {args.shutdown_grace_s:g}s", file=sys.stderr,
                  flush=True)
            _drain(serve, deployment_plan(args).ingress["num_replicas"], args.shutdown_grace_s, stop)
        except KeyboardInterrupt:  # a signal during start-up: nothing to drain
            print("stopping during start-up", file=sys.stderr, flush=True)
        finally:
            serve.shutdown()
            stop.restore()
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    print("stopped", file=sys.stderr, flush=True)


def _drain(serve, replicas: int, grace_s: float, stop: "_StopSignals") -> None:
    """Drain every Ingress replica, unless a second signal comes first (the drain is then abandoned)."""
    ingress = serve.get_deployment_handle("Ingress", APP_NAME)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (_drain_all(ingress, replicas, grace_s), done.set()), daemon=True)
    waiter.start()
    while not done.wait(0.1):
        if stop.count > 1:
            print("second signal: stopping without draining", file=sys.stderr, flush=True)
            return


def _drain_all(ingress, replicas: int, grace_s: float) -> None:
    """A handle call reaches one replica, Serve's choice: so drain calls go out together, several a replica, in
    rounds until each replica has answered (a drained one answers at once)."""
    drained: set[str] = set()
    for _ in range(_DRAIN_ROUNDS):
        responses = [ingress.drain.remote(grace_s) for _ in range(2 * (replicas - len(drained)))]
        try:
            drained.update(response.result(timeout_s=grace_s + 30)[0] for response in responses)
        except Exception as e:  # an Ingress is gone or stuck: shut down regardless
            print(f"draining the Ingress failed: {e}", file=sys.stderr, flush=True)
            return
        if len(drained) >= replicas:
            return
    print(f"drained {len(drained)} of {replicas} Ingress replicas", file=sys.stderr, flush=True)


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
