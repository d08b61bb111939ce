"""The engine's step loop, this tree against an earlier git revision, side by side in one run.

    python benchmarks/engine_revisions.py --baseline REV [--model mini] [--requests 64] [--concurrency 16]
                                          [--tokens 32] [--rounds 5] [--out rows.json]

Each system is a process of its own, started once from its tree (the baseline's extracted with `git archive`) and
kept: it loads the checkpoint, warms up, then runs one round whenever told, so that rounds alternate between the
systems and a noisy moment hits all of them alike. A round is the same seeded requests (greedy, `--tokens` out
each), `--concurrency` of them in the engine at once, driven through `LLMEngine.step()` on the calling thread (no
event loop, no HTTP). Systems: the baseline, this tree as configured by default on the device, and this tree with
`async_scheduling` forced on (on a CPU, its only cost: each output leaves a step later). Prints each system's median
output tokens/s and its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from side_by_side import extract, write_rows  # noqa: E402  (benchmarks/side_by_side.py)


def worker(opts: argparse.Namespace) -> None:
    """A system's process: load, warm up, then one timed round per line read from stdin (seconds printed)."""
    import time

    import torch

    from cluster.checkpoint.weights import model_directory
    from cluster.engine.engine import EngineConfig, LLMEngine
    from cluster.engine.sampling_params import SamplingParams
    from cluster.model.loader import load_model
    from cluster.tokenizer import load_tokenizer

    torch.manual_seed(0)
    loaded = load_model(model_directory(opts.model, "random"), dtype=opts.dtype, load_format="random")
    tok = load_tokenizer("v3")
    extra = {} if opts.async_scheduling is None else {"async_scheduling": opts.async_scheduling == "on"}
    engine = LLMEngine(loaded.model, tok.decode, tok.eos_id, EngineConfig(max_num_seqs=opts.concurrency, **extra))
    g = torch.Generator().manual_seed(opts.seed)
    prompts = [torch.randint(3, loaded.model.config.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 128, (opts.requests,), generator=g)]
    params = SamplingParams(max_tokens=opts.tokens, temperature=0, ignore_eos=True)

    def one_round(tag: int) -> None:
        queue = list(enumerate(prompts))
        live = 0
        while queue or engine.has_work():
            while queue and live < opts.concurrency:
                i, prompt = queue.pop(0)
                engine.add_request(f"{tag}-{i}", prompt, params)
                live += 1
            live -= sum(out.finished for out in engine.step())

    with torch.inference_mode():
        one_round(-1)
        print("ready", flush=True)
        for n, _ in enumerate(sys.stdin):
            start = time.perf_counter()
            one_round(n)
            print(time.perf_counter() - start, flush=True)


class System:
    def __init__(self, name: str, tree: Path, opts: argparse.Namespace, async_scheduling: str | None):
        self.name = name
        command = [sys.executable, __file__, "--worker", "--model", opts.model, "--dtype", opts.dtype,
                   "--requests", str(opts.requests), "--concurrency", str(opts.concurrency),
                   "--tokens", str(opts.tokens), "--seed", str(opts.seed)]
        command += ["--async-scheduling", async_scheduling] if async_scheduling else []
        env = {**os.environ, "PYTHONPATH": str(tree)}  # that tree's `cluster`, not the installed one
        self.process = subprocess.Popen(command, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.times: list[float] = []

    def wait_ready(self) -> None:
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{self.name} did not start (said {line!r})")

    def round(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        self.times.append(float(self.process.stdout.readline()))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="the git revision to compare with")
    parser.add_argument("--model", default="mini", help="a shape's name (random weights, seeded)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--async-scheduling", choices=["on", "off"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts)
        return 0
    if not opts.baseline:
        parser.error("--baseline is required")
    with tempfile.TemporaryDirectory() as tmp:
        systems = [System(f"baseline {opts.baseline}", extract(opts.baseline, Path(tmp)), opts, None),
                   System("this tree", ROOT, opts, None), System("this tree, async on", ROOT, opts, "on")]
        try:
            for system in systems:
                system.wait_ready()
            for _ in range(opts.rounds):
                for system in systems:
                    system.round()
        finally:
            for system in systems:
                system.close()
    tokens = opts.requests * opts.tokens
    base = tokens / statistics.median(systems[0].times)
    rows = []
    print(f"{opts.model}: {opts.requests} requests x {opts.tokens} tokens at concurrency {opts.concurrency}, "
          f"median of {opts.rounds} alternating rounds")
    for system in systems:
        rate = tokens / statistics.median(system.times)
        rows.append({"system": system.name, "tokens_per_s": round(rate, 1), "vs_baseline": round(rate / base, 3)})
        print(f"  {system.name:<28}{rate:>9.1f} tok/s  {rate / base:.3f}x")
    write_rows(opts.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
