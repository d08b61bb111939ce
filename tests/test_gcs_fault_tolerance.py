"""GCS fault tolerance, for real (k8s/overlays/autoscaling's gcsFaultToleranceOptions): a local Ray head keeps its
state in an external Redis, `moe-cluster serve` joins it, and the GCS process is killed while streams run and
started again with the same arguments (the GCS alone: on KubeRay the whole head pod restarts, its raylet and the
Serve controller with it, which one machine cannot show without also stopping the unit). Requests are served while
it is down, every stream ends complete, and the unit is the same process afterwards (nothing reloaded). Without
Redis the restarted GCS knows no node, actor or placement group, and the cluster does not come back: that is what
the overlay's Redis prevents.

Everything runs in processes of its own (Redis, the Ray head, the server): the test process may hold another local
Ray (tests/conftest.py), and no `ray stop` is ever used (it stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from cluster.parallel.channel import free_port
from tests.http import sse_line_chunks
from tests.tools import required_tool
from tests.waiting import wait_until

STREAMS = 4
STREAM_TOKENS = 400  # long enough to run through the GCS's restart
CHAT = {"messages": [{"role": "user", "content": "Raconte une histoire."}], "temperature": 0}


def _answers_ping(port: int, password: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            reply = b""
            while b"+PONG" not in reply and (part := s.recv(64)):  # "+OK" and "+PONG", in one read or two
                reply += part
            return b"+PONG" in reply
    except OSError:
        return False


@pytest.fixture
def redis() -> Iterator[tuple[int, str]]:
    """A throwaway Redis on loopback with a password: (port, password)."""
    port, password = free_port("127.0.0.1"), secrets.token_hex(16)
    work = tempfile.mkdtemp(prefix="redis")
    server = required_tool("redis-server", "(Debian's redis-server) for the GCS's Redis")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
                             "--save", "", "--appendonly", "no", "--dir", work],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers_ping(port, password) or proc.poll() is not None, 30, "Redis to answer")
        assert proc.poll() is None
        yield port, password
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


class _Head:
    """A Ray head started with `ray start --head`, its GCS backed by Redis; its processes are found by the temporary
    directory in their arguments."""

    def __init__(self, redis_port: int, password: str):
        self.temp_dir = tempfile.mkdtemp(prefix="rayft", dir="/tmp")  # short: socket paths must fit 107 characters
        self.port = free_port("127.0.0.1")
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_REDIS_ADDRESS": f"127.0.0.1:{redis_port}",
                    "RAY_external_storage_namespace": f"moe-{secrets.token_hex(4)}"}
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "start", "--head", "--port", str(self.port), "--redis-password", password,
                        "--num-cpus", "8", "--include-dashboard", "false", "--disable-usage-stats",
                        "--temp-dir", self.temp_dir], env=self.env, check=True, capture_output=True, timeout=180)
        self.address = f"127.0.0.1:{self.port}"

    def gcs_pid(self) -> int | None:
        for pid in self._pids():
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"gcs_server"):
                return pid
        return None

    def _pids(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and self.temp_dir.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
        return found

    def kill_gcs(self) -> list[bytes]:
        """SIGKILL the GCS -> its command line, to start it again."""
        pid = self.gcs_pid()
        assert pid is not None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: self.gcs_pid() is None, 30, "the GCS to die")
        return argv

    def start_gcs(self, argv: list[bytes]) -> None:
        subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)

    def stop(self) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _health(url: str) -> dict | None:
    try:
        r = httpx.get(f"{url}/health", timeout=5)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def _stream(url: str, out: list) -> None:
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=300,
                      json={**CHAT, "stream": True, "max_tokens": STREAM_TOKENS, "ignore_eos": True}) as r:
        out.append((r.status_code, sse_line_chunks(r.iter_lines()) if r.status_code == 200 else r.read()))


@pytest.mark.e2e
def test_the_units_survive_a_gcs_restart_with_redis(tiny_dir, redis):
    head = _Head(*redis)
    server = None
    try:
        port = free_port("127.0.0.1")
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--model", str(tiny_dir), "--port", str(port),
             "--device", "cpu", "--dtype", "fp32", "--kv-cache-bytes", "32MiB", "--shards", "1"],
            env={**head.env, "RAY_ADDRESS": head.address}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(server.stdout), daemon=True).start()
        wait_until(lambda: _health(url) or server.poll() is not None, 240, lambda: "".join(log)[-3000:])
        unit_pid = _health(url)["stats"]["pid"]

        results: list = []
        streams = [threading.Thread(target=_stream, args=(url, results)) for _ in range(STREAMS)]
        for t in streams:
            t.start()
        argv = head.kill_gcs()
        # While the GCS is down: the proxies and replicas need it for nothing a request does.
        r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 8}, timeout=120)
        assert r.status_code == 200, r.text
        time.sleep(2)  # down a while, as a head pod restarting is (not a synchronization: the outage's length)
        head.start_gcs(argv)
        ray = str(Path(sys.executable).with_name("ray"))
        wait_until(lambda: subprocess.run([ray, "status", "--address", head.address], env=head.env,
                                          capture_output=True, timeout=60).returncode == 0, 120,
                   "the restarted GCS to answer")
        for t in streams:
            t.join(300)
        assert [status for status, _ in results] == [200] * STREAMS, results
        for _, chunks in results:  # every stream complete: nothing lost
            assert chunks[-1]["choices"][-1]["finish_reason"] == "length", json.dumps(chunks[-1])
            assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) > 0
        # The restarted GCS knows the app: Serve's controller and the unit are the ones from before.
        r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 8}, timeout=120)
        assert r.status_code == 200, r.text
        assert _health(url)["stats"]["pid"] == unit_pid  # the same unit process: nothing reloaded
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        head.stop()
