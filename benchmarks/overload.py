"""Overload: how fast `moe-cluster serve --no-ray` refuses the requests it has no room for.

One server process (`--max-num-seqs`/`--max-waiting`, the defaults' 192 places), then `--clients` connections
opened, then a streaming chat request sent on each at once (bare asyncio protocols: an HTTP client library would
cost this process more than the server spends). The goal (issue 24): the refused ones get their 429 at once, median
<= 0.25 s on a 2-core machine, while the admitted streams still get their first token.

Printed per server and round: every status seen, how many 429s said `Connection: close` (the single-process
server's answers from the request head), the 429s' min/median/p90/max seconds (from the request's last byte sent to
the response's status line) and the admitted streams' time to first token. With `--baseline REV` the same load
runs, in turn, against a server started from that git revision (extracted with `git archive` into a temporary
directory), so the two are measured side by side on one machine; `--floor` adds a bare asyncio server that answers
429 to anything, the client's and machine's own share.

    python benchmarks/overload.py                        # a random tiny checkpoint, 1000 clients
    python benchmarks/overload.py --baseline HEAD~3 --rounds 3

Connections come from several loopback addresses (127.0.0.2, 127.0.0.3, ...), at most `--per-address` each, so the
server's per-client connection cap (`--max-connections-per-client`) is not what refuses them.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.parallel.channel import free_port  # noqa: E402
from side_by_side import extract  # noqa: E402  (benchmarks/side_by_side.py)


@dataclass
class Outcome:
    status: int | None = None  # None: no answer (connection reset, or the run's timeout)
    status_s: float | None = None  # from the request's last byte sent to the response's status line
    first_token_s: float | None = None  # an admitted stream: from the request sent to its first content chunk
    retry_after: str | None = None
    closing: bool = False  # the answer said `Connection: close` (the single-process server's answers from the head)
    error: str | None = None


@dataclass
class Run:
    label: str
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict:
        refused = sorted(o.status_s for o in self.outcomes if o.status == 429 and o.status_s is not None)
        first = sorted(o.first_token_s for o in self.outcomes if o.first_token_s is not None)
        statuses: dict[str, int] = {}
        for o in self.outcomes:
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
        return {"server": self.label, "statuses": statuses, "refused_429": len(refused),
                "refused_closing": sum(o.status == 429 and o.closing for o in self.outcomes),
                "refusal_min_s": _round(refused[0] if refused else None),
                "refusal_median_s": _round(_quantile(refused, 0.5)),
                "refusal_p90_s": _round(_quantile(refused, 0.9)),
                "refusal_max_s": _round(refused[-1] if refused else None),
                "retry_after": sorted({o.retry_after for o in self.outcomes if o.status == 429 and o.retry_after}),
                "admitted_first_token_median_s": _round(_quantile(first, 0.5)),
                "admitted_first_token_p90_s": _round(_quantile(first, 0.9))}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def request_bytes(port: int, max_tokens: int) -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": "Count to three."}], "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": True}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class _Client(asyncio.Protocol):
    """One connection's request and response, timed as its bytes arrive (a bare protocol: the client's own cost
    stays small beside the server's)."""

    def __init__(self) -> None:
        self.out = Outcome()
        self.done = asyncio.get_running_loop().create_future()
        self.received = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, raw: bytes) -> None:
        assert self.transport is not None
        self.transport.write(raw)
        self.sent_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic() - self.sent_at
        out = self.out
        self.received += data
        if out.status is None:
            head, sep, _ = self.received.partition(b"\r\n\r\n")
            if not sep:
                return
            out.status_s = now
            lines = head.decode("latin-1").split("\r\n")
            out.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "retry-after":
                    out.retry_after = value.strip()
                elif name.strip().lower() == "connection":
                    out.closing = value.strip().lower() == "close"
            if out.status != 200:
                self._finish()
                return
        if out.first_token_s is None and b'"content":"' in data.replace(b'"content":""', b""):
            out.first_token_s = now
        if b"data: [DONE]" in self.received[-64:]:
            self._finish()
        self.received = self.received[-64:]  # enough to find [DONE] split across reads

    def connection_lost(self, exc: Exception | None) -> None:
        if self.out.status is None:
            self.out.error = f"closed before an answer: {exc!r}"
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def burst(port: int, clients: int, per_address: int, max_tokens: int, timeout_s: float) -> list[Outcome]:
    """Every connection opened first (as a client's pool would hold them), then every request sent at once."""
    loop = asyncio.get_running_loop()
    raw = request_bytes(port, max_tokens)
    sources = [f"127.0.0.{2 + i // per_address}" for i in range(clients)]
    connected = await asyncio.gather(*(loop.create_connection(_Client, "127.0.0.1", port, local_addr=(s, 0))
                                       for s in sources))
    protocols = [p for _, p in connected]
    for p in protocols:
        p.send(raw)
    await asyncio.wait([p.done for p in protocols], timeout=timeout_s)
    for p in protocols:
        if not p.done.done():
            p.out.error = "timed out"
            p.transport.close()
    return [p.out for p in protocols]


class Server:
    """`moe-cluster serve --no-ray` from `source` (a source tree), on a free port."""

    def __init__(self, source: Path, label: str, flags: list[str]):
        self.port = free_port("127.0.0.1")
        self.label = label
        env = {**os.environ, "PYTHONPATH": str(source)}  # that tree's `cluster`, not the installed one
        self.process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--no-ray", "--port",
                                         str(self.port), *flags], cwd=source, env=env)

    async def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the {self.label} server exited ({self.process.returncode})")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                ok = (await reader.readline()).startswith(b"HTTP/1.1 200")
                writer.close()
                if ok:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.5)
        raise SystemExit(f"the {self.label} server did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


class FloorServer:
    """The least a server can do: a bare asyncio protocol answering 429 to the first bytes of each connection. What
    it measures is this machine's and this client's own share of a refusal's time."""

    label = "floor (bare asyncio 429)"

    def __init__(self) -> None:
        self.port = free_port("127.0.0.1")
        self.process = subprocess.Popen([sys.executable, __file__, "--serve-floor", str(self.port)])

    wait_ready = Server.wait_ready
    stop = Server.stop


class _Floor(asyncio.Protocol):
    ANSWER = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 5\r\n"
              b"connection: close\r\ncontent-length: 2\r\n\r\n{}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"GET /health"):
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        else:
            self.transport.write(self.ANSWER)
        self.transport.close()


def serve_floor(port: int) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_Floor, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    asyncio.run(serve())


async def measure(servers: list, opts: argparse.Namespace) -> list[Run]:
    runs = []
    for server in servers:
        await server.wait_ready()
    for round_ in range(opts.rounds):
        for server in servers:
            outcomes = await burst(server.port, opts.clients, opts.per_address, opts.max_tokens, opts.timeout_s)
            run = Run(f"{server.label} (round {round_ + 1})", outcomes)
            runs.append(run)
            print(json.dumps(run.summary()), flush=True)
            errors = [o.error for o in outcomes if o.error]
            if errors:
                print(f"  {len(errors)} clients got no answer, e.g. {errors[0]}", flush=True)
    return runs


def _client_loop():
    """uvloop for the clients where it is installed (a smaller share of the machine for the client)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: a random checkpoint of --preset, written "
                                        "to a temporary directory)")
    parser.add_argument("--preset", choices=["tiny", "mini"], default="tiny")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-address", type=int, default=50, help="connections from one source address")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-waiting", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64, help="of each admitted stream (ignore_eos)")
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", metavar="REV", help="also measure a server from this git revision")
    parser.add_argument("--floor", action="store_true", help="also measure a bare asyncio server's 429s")
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve_floor:
        serve_floor(opts.serve_floor)
        return 0
    flags = ["--max-num-seqs", str(opts.max_num_seqs), "--max-waiting", str(opts.max_waiting)]
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        model = opts.model or str(Path(tmp) / opts.preset)
        if opts.model is None:
            subprocess.run([sys.executable, "-m", "cluster.cli", "make-checkpoint", model, "--preset", opts.preset,
                            "--dtype", "fp32"], cwd=ROOT, check=True)
        flags += ["--model", model]
        servers: list[Server | FloorServer] = [Server(ROOT, "this tree", flags)]
        if opts.baseline:
            servers.append(Server(extract(opts.baseline, Path(tmp)), opts.baseline, flags))
        if opts.floor:
            servers.append(FloorServer())
        try:
            with asyncio.Runner(loop_factory=_client_loop()) as runner:
                runner.run(measure(servers, opts))
        finally:
            for server in servers:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
