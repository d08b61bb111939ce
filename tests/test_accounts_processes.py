"""Keys and credits across a killed server: `moe-cluster serve --no-ray --db` in a subprocess, killed (SIGKILL)
mid-stream, then started again on the same SQLite ledger. The charge settled before the kill stays; the stream's
reservation, left open by the dead process, is released by the next start (its TTL has passed by then)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from cluster.ledger import Pricing, open_ledger
from cluster.parallel.channel import free_port

pytestmark = pytest.mark.e2e  # starts servers

PROMPT = [1, 100, 200, 300]


@contextmanager
def server(tiny_dir: Path, db: str, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--no-ray", "--model", str(tiny_dir), "--device", "cpu",
           "--dtype", "fp32", "--moe-backend", "torch", "--attention-backend", "torch", "--kv-cache-bytes", "16MiB",
           "--port", str(port), "--db", db, "--reservation-ttl-s", "1", "--price-input-per-million", "1",
           "--price-output-per-million", "3"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def ledger_state(db: str, key_id: str) -> tuple[int, int, list[int]]:
    """(balance, open reservations, the usage log's costs)."""
    ledger = open_ledger(db)
    try:
        balance = next(k.balance_micro for k in await ledger.list_keys() if k.key_id == key_id)
        return balance, await ledger.open_reservations(), [u.cost_micro for u in await ledger.usage(key_id)]
    finally:
        await ledger.close()


async def new_key(db: str, credits: int) -> tuple[str, str]:
    ledger = open_ledger(db)
    try:
        record, key = await ledger.create_key("kill", credits)
        return record.key_id, key
    finally:
        await ledger.close()


def test_a_killed_servers_reservation_is_released_on_restart(tiny_dir, tmp_path):
    db, log, credits = f"sqlite:///{tmp_path}/ledger.db", tmp_path / "server.log", 1_000_000
    key_id, key = asyncio.run(new_key(db, credits))
    headers = {"x-api-key": key}
    body = {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    settled = Pricing(1_000_000, 3_000_000).cost(len(PROMPT), 4)
    with server(tiny_dir, db, log) as (proc, base):
        done = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60)
        assert done.status_code == 200, done.text
        long = body | {"max_tokens": 2000, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=long, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream: the stream's reservation stays open
            proc.wait(10)
    balance, open_now, costs = asyncio.run(ledger_state(db, key_id))
    assert open_now == 1 and costs == [settled]
    assert balance < credits - settled  # the open reservation holds the stream's worst case
    time.sleep(1.1)  # past the reservation's TTL
    with server(tiny_dir, db, log) as (_, base):  # start-up releases what the dead process left open
        balance, open_now, costs = asyncio.run(ledger_state(db, key_id))
        assert "no --db" not in log.read_text()
    assert (balance, open_now, costs) == (credits - settled, 0, [settled])
