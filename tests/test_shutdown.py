"""SIGTERM stops `moe-cluster serve` gracefully, in one process and on Ray: streams in flight finish (or, past the
grace period, end with an error event and [DONE]), new requests get 503 meanwhile, the exit code is 0, and no
process or /dev/shm file is left behind."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from cluster.parallel.channel import free_port
from tests.http import data_of
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e  # a server process of its own

STREAMS = 8


def _stream_body(max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": "Bonjour, qui es-tu ?"}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": 3, "stream": True}


def _ray_processes() -> set[int]:
    """Processes of a Ray cluster that `moe-cluster serve` started (its temporary directory is in their arguments)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"moe-ray-" in (proc / "cmdline").read_bytes():
                found.add(int(proc.name))
        except OSError:
            pass
    return found


def _session(sid: int) -> set[int]:
    """Live processes of session `sid` (the server was started in a session of its own)."""
    members = set()
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if proc.name.isdigit() and int(fields[3]) == sid and fields[0] != "Z":
                members.add(int(proc.name))
        except (OSError, IndexError, ValueError):
            pass
    return members


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


class Server:
    def __init__(self, tiny_dir: Path, ray: bool, grace_s: float):
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--model", str(tiny_dir), "--port", str(self.port),
               "--device", "cpu", "--dtype", "fp32", "--kv-cache-bytes", "32MiB", "--shutdown-grace-s", str(grace_s)]
        # On Ray two Ingress replicas, as on a cluster: the driver must drain each (the streams land on both).
        mode = ["--ingress-replicas", "2"] if ray else ["--no-ray"]
        self.proc = subprocess.Popen(cmd + mode, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        # Ready: the CLI logged so (a signal before that line stops start-up at once) and /health answers.
        wait_until(lambda: self._logged("serving ") and self._healthy() or self.proc.poll() is not None, 240,
                   self.tail)
        assert self.proc.poll() is None, self.tail()

    def _logged(self, sentence: str) -> bool:
        return any(sentence in line for line in self.log)

    def tail(self) -> str:
        return "".join(self.log)[-3000:]

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def _streams(url: str, max_tokens: int) -> tuple[list[list[str]], threading.Event, list[threading.Thread]]:
    """STREAMS streaming requests on threads -> (each one's data lines, set once every stream has content)."""
    lines: list[list[str]] = [[] for _ in range(STREAMS)]
    started = [threading.Event() for _ in range(STREAMS)]

    def one(i: int) -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=_stream_body(max_tokens), timeout=120) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if (payload := data_of(line)) is not None:
                    lines[i].append(payload)
                    started[i].set()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(STREAMS)]
    for t in threads:
        t.start()
    everyone = threading.Event()
    threading.Thread(target=lambda: all(s.wait(120) for s in started) and everyone.set(), daemon=True).start()
    return lines, everyone, threads


def _outcome(stream: list[str]) -> str:
    """How a stream ended: "complete" (its last chunk has a finish_reason), "cut" (an error event saying the server
    is shutting down), or what it was."""
    if not stream or stream[-1] != "[DONE]":
        return f"no [DONE]: {stream[-3:]}"
    last = json.loads(stream[-2])
    if last.get("choices") and last["choices"][-1].get("finish_reason") in ("length", "stop"):
        return "complete"
    return "cut" if "shutting down" in last.get("error", {}).get("message", "") else repr(last)


# The Ray case is the cut one: the drain is the same middleware there, in the Ingress.
@pytest.mark.parametrize("ray, grace_s, max_tokens, finish", [(False, 60.0, 48, "complete"),
                                                               (False, 2.0, 4000, "cut"), (True, 2.0, 4000, "cut")],
                         ids=["no-ray-complete", "no-ray-cut", "ray-cut"])
def test_sigterm_drains_then_exits_0_leaving_nothing(tiny_dir, ray, grace_s, max_tokens, finish):
    shm_before, ray_before = _shm(), _ray_processes()
    server = Server(tiny_dir, ray, grace_s)
    try:
        lines, everyone, threads = _streams(server.url, max_tokens)
        assert everyone.wait(120), server.tail()
        server.proc.send_signal(signal.SIGTERM)
        # On Ray the driver first reaches every Ingress replica; the single process closes at once.
        closed = "every Ingress replica (2) stopped admitting" if ray else "SIGTERM: draining"
        wait_until(lambda: server._logged(closed), 60, server.tail)  # a bound for a hung driver, not a timing claim
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={**_stream_body(4), "stream": False},
                             timeout=30)
        for t in threads:
            t.join(120)
        assert server.proc.wait(120) == 0, server.tail()
    finally:
        server.stop()
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
    assert refused.json()["error"]["type"] == "service_unavailable_error"
    assert [_outcome(stream) for stream in lines] == [finish] * STREAMS
    # On Ray both Ingress replicas carried streams, and the driver drained each.
    drained = re.findall(r"draining Ingress replica (\S+) \((\d+) requests in flight\)", "".join(server.log))
    assert len({replica for replica, _ in drained}) == (2 if ray else 0), drained
    assert all(int(in_flight) > 0 for _, in_flight in drained), drained
    # The kernel reaps the last children, and they their files, a moment after the server's exit.
    wait_until(lambda: not _session(server.proc.pid), 30, lambda: f"session members {_session(server.proc.pid)}")
    wait_until(lambda: not _ray_processes() - ray_before, 30, lambda: f"Ray processes {_ray_processes() - ray_before}")
    wait_until(lambda: not _shm() - shm_before, 30, lambda: f"/dev/shm files {_shm() - shm_before}")
