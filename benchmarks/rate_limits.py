"""What a rate-limited key's check costs the ledger: `take_rate` on SQLite and PostgreSQL, this tree beside a git
revision, in one run.

    python benchmarks/rate_limits.py --baseline 865a5f2 [--takes 512] [--concurrency 64] [--rounds 3]

Each round, for each store and each code version in turn (a subprocess with that tree first on PYTHONPATH, a fresh
database each): `--takes` takes of one request and 100 tokens on one key whose limits they stay under, `--concurrency`
at once (the worst case: every take queues on the same key). Prints the mean seconds per take. PostgreSQL is a
throwaway server started with tests/postgres.py.
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
from pathlib import Path

from side_by_side import extract  # benchmarks/side_by_side.py

ROOT = Path(__file__).resolve().parents[1]


async def measure(url: str, takes: int, concurrency: int) -> float:
    """Mean seconds per take_rate call (run with the tree under test first on sys.path)."""
    from cluster.ledger import open_ledger

    ledger = open_ledger(url)
    try:
        key_id = (await ledger.create_key("bench", 0))[0].key_id
        limit = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with limit:
                await ledger.take_rate(key_id, 1, 100, rpm=10 * takes, tpm=1000 * takes)

        await one()  # the pool and the schema, before timing
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(takes)))
        return (time.perf_counter() - start) / takes
    finally:
        await ledger.close()


def run_worker(tree: Path, url: str, takes: int, concurrency: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", url, "--takes", str(takes), "--concurrency",
                          str(concurrency)], env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REV", required=False)
    parser.add_argument("--takes", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(asyncio.run(measure(opts.worker, opts.takes, opts.concurrency)))
        return 0
    sys.path.insert(0, str(ROOT))
    from tests.postgres import fresh_database, postgres_server

    with tempfile.TemporaryDirectory(prefix="rate-bench-") as tmp, postgres_server() as pg:
        trees = {"this tree": ROOT}
        if opts.baseline:
            trees[opts.baseline] = extract(opts.baseline, Path(tmp))
        for round_ in range(1, opts.rounds + 1):
            for store in ("sqlite", "postgres"):
                for index, (label, tree) in enumerate(trees.items()):
                    url = (f"sqlite:///{tmp}/{round_}-{store}-{index}.db" if store == "sqlite"
                           else fresh_database(pg))
                    seconds = run_worker(tree, url, opts.takes, opts.concurrency)
                    print(json.dumps({"round": round_, "store": store, "code": label,
                                      "ms_per_take": round(seconds * 1000, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
