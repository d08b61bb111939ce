"""Soak: `moe-cluster serve --no-ray` under steady load, its resident memory (RSS) sampled every minute.

The goal (issue 16): after the first minute, RSS grows by less than 2%. Clients keep `--concurrency` chat requests
in flight (seeded prompts of varied lengths, streaming and not, some abandoned mid-stream), so the engine allocates,
frees and reuses blocks, detokenizer state and HTTP buffers the way a long-running service does.

    python benchmarks/soak.py                    # 10 minutes on the embedded mini checkpoint
    python benchmarks/soak.py --minutes 2 --model DIR

Prints one JSON line per minute and a verdict; exits 1 when growth after the first minute is 2% or more.
Not part of the test suite (it takes minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.parallel.channel import free_port  # noqa: E402

WORDS = "le chat dort sur la table pendant que la pluie tombe doucement dans le jardin".split()
GROWTH_LIMIT = 0.02


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def client(url: str, seed: int, stop: asyncio.Event, counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while not stop.is_set():
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 400)))
            body = {"messages": [{"role": "user", "content": words}], "max_tokens": rng.randint(8, 96),
                    "temperature": 0.8, "seed": rng.randint(0, 2**31), "stream": rng.random() < 0.5}
            if body["stream"]:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    leave_after = 4 if rng.random() < 0.2 else None  # a client that leaves mid-stream
                    lines = 0
                    async for _ in r.aiter_lines():
                        lines += 1
                        if leave_after is not None and lines > leave_after:
                            counts["abandoned"] += 1
                            break
            else:
                (await http.post("/v1/chat/completions", json=body)).raise_for_status()
            counts["requests"] += 1


async def soak(url: str, pid: int, minutes: int, concurrency: int) -> list[dict]:
    stop = asyncio.Event()
    counts = {"requests": 0, "abandoned": 0}
    clients = [asyncio.create_task(client(url, seed, stop, counts)) for seed in range(concurrency)]
    rows = []
    t0 = time.monotonic()
    for minute in range(1, minutes + 1):
        await asyncio.sleep(max(0.0, t0 + 60 * minute - time.monotonic()))
        row = {"minute": minute, "rss_mb": round(rss_bytes(pid) / 2**20, 1), **counts}
        rows.append(row)
        print(json.dumps(row), flush=True)
    stop.set()
    await asyncio.gather(*clients, return_exceptions=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded mini checkpoint)")
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    opts = parser.parse_args()
    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--no-ray", "--port", str(port)]
    server = subprocess.Popen(cmd + (["--model", opts.model] if opts.model else []), cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(1)
        print(json.dumps({"minute": 0, "rss_mb": round(rss_bytes(server.pid) / 2**20, 1)}), flush=True)
        rows = asyncio.run(soak(url, server.pid, opts.minutes, opts.concurrency))
    finally:
        server.terminate()
        server.wait(60)
    if len(rows) < 2:
        print("too short to judge: needs 2 minutes or more")
        return 0
    first, last = rows[0]["rss_mb"], rows[-1]["rss_mb"]
    growth = (last - first) / first
    print(f"RSS after minute 1: {first} MB, after minute {rows[-1]['minute']}: {last} MB, growth {growth:+.2%} "
          f"(limit {GROWTH_LIMIT:.0%}): {'OK' if growth < GROWTH_LIMIT else 'TOO MUCH'}")
    return 0 if growth < GROWTH_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
