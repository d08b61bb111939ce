"""What a long prompt does to the streams running beside it, under the engine's step budgets and under a plain token
budget (the scheduler before step costs), side by side in one run.

    python benchmarks/long_prompt.py [--prompt-tokens 30000] [--bystanders 4] [--requests 256] [--rounds 2]
        [--model DIR] [--step-cost flops|measured] [--json FILE]

For each policy, on one engine (CPU by default, the embedded mini checkpoint):
  alone    `--bystanders` streams decode on their own: their inter-token latency (ITL) p50/p99;
  beside   a `--prompt-tokens` prompt arrives while they decode: their ITL from its arrival to its first token, and
           its time to first token (TTFT); then its TTFT on its own;
  traffic  `--requests` of benchmarks/engine.py's workload (prompts of 32..512 tokens, outputs of 16..256) at c=64,
           `--rounds` times per policy, interleaved: output tokens/s, what the budgets cost ordinary traffic.
Policies: `tokens` is the scheduler's rule before step costs, reproduced in this tree by its settings (every token
costs 1 against max_num_batched_tokens, nothing caps a prompt beside decodes: the code path the old scheduler
took); `step cost` is the serving default (cluster/engine/step_cost.py priced as
--step-cost, and prefill_budget_beside_decodes). Prints the bystanders' ITL p99 beside / alone (goal: <= 3 under
step costs), the long prompt's TTFT step cost / tokens, and traffic tokens/s step cost / tokens (goal: >= 0.97).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.checkpoint.default import ensure_default_checkpoint  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from cluster.engine.async_engine import AsyncEngine  # noqa: E402
from cluster.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from cluster.engine.sampling_params import SamplingParams  # noqa: E402
from cluster.engine.step_cost import StepCost  # noqa: E402
from cluster.model.loader import load_model  # noqa: E402
from engine import make_requests, run_engine, text_decoder  # noqa: E402  (benchmarks/engine.py)

BYSTANDER_PROMPT = 200
ALONE_TOKENS = 60  # tokens each bystander decodes for the `alone` measurement
TRAFFIC_CONCURRENCY = 64


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def measure(engine: LLMEngine, prompt_tokens: int, bystanders: int, seed: int) -> dict:
    """The long prompt's TTFT; with bystanders, also their ITL before it arrives and while it prefills."""
    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size
    endless = SamplingParams(max_tokens=engine.context_len - BYSTANDER_PROMPT, temperature=0, ignore_eos=True)
    names = [f"bystander-{i}" for i in range(bystanders)]
    for name in names:
        engine.add_request(name, _prompt(rng, BYSTANDER_PROMPT, vocab), endless)

    long = _prompt(rng, prompt_tokens, vocab)  # made before the clocks run

    def arrive() -> float:
        engine.add_request("long", long, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        return time.perf_counter()

    last: dict[str, float] = {}
    alone: list[float] = []
    beside: list[float] = []
    ttft = None
    arrived = None if bystanders else arrive()
    steps = 0
    while ttft is None:
        outs = engine.step()
        now = time.perf_counter()
        steps += arrived is not None
        for out in outs:
            if out.request_id == "long" and out.token_ids:
                ttft = now - arrived
            elif out.token_ids and out.request_id in last:
                (alone if arrived is None else beside).append(now - last[out.request_id])
            if out.token_ids:
                last[out.request_id] = now
        if arrived is None and len(alone) >= ALONE_TOKENS * bystanders:
            arrived = arrive()
    for name in names:
        engine.abort(name)
    result = {"long_prompt_ttft_s": round(ttft, 1), "steps_while_prefilling": steps}
    if bystanders:
        result |= {"itl_alone_p50_ms": round(1000 * _pct(alone, 50), 1),
                   "itl_alone_p99_ms": round(1000 * _pct(alone, 99), 1),
                   "itl_beside_p50_ms": round(1000 * _pct(beside, 50), 1),
                   "itl_beside_p99_ms": round(1000 * _pct(beside, 99), 1),
                   "itl_p99_beside_over_alone": round(_pct(beside, 99) / _pct(alone, 99), 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=30000)
    parser.add_argument("--bystanders", type=int, default=4)
    parser.add_argument("--model", type=Path, default=None, help="default: the embedded mini checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=256,
                        help="ordinary traffic to compare throughput on (benchmarks/engine.py's workload; 0: none)")
    parser.add_argument("--rounds", type=int, default=2, help="traffic runs per policy, interleaved")
    parser.add_argument("--step-cost", choices=("flops", "measured"), default=None,
                        help="default: as `moe-cluster serve` (measured on CPU, flops on GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    model_dir = args.model or ensure_default_checkpoint()
    model_config = ModelConfig.from_file(model_dir)
    decode, eos_id = text_decoder(model_config)
    config = EngineConfig(max_num_seqs=TRAFFIC_CONCURRENCY,
                          step_cost=args.step_cost or ("measured" if args.device == "cpu" else "flops"))
    # One engine thread for everything (the long-prompt runs step it directly through `call`).
    front = AsyncEngine(lambda: LLMEngine(load_model(model_dir, "auto", args.device).model, decode, eos_id, config))
    step_cost = front.engine.scheduler.config
    tokens_only = dataclasses.replace(step_cost, prefill_budget_beside_decodes=None, cost=StepCost(float("inf")))
    results = {"device": args.device, "dtype": str(front.engine.kv_cache_dtype), "prompt_tokens": args.prompt_tokens,
               "bystanders": args.bystanders, "step_cost": config.step_cost,
               "break_even": round(step_cost.cost.break_even),
               "prefill_budget_beside_decodes": step_cost.prefill_budget_beside_decodes,
               "max_num_batched_tokens": step_cost.max_num_batched_tokens,
               "threads": front.call(lambda e: torch.get_num_threads()).result()}
    policies = {"tokens": tokens_only, "step cost": step_cost}
    for name, scheduling in policies.items():
        front.call(lambda e: setattr(e.scheduler, "config", scheduling)).result()
        for label, bystanders in (("beside", args.bystanders), ("alone", 0)):
            front.call(lambda e: e.blocks.reset_prefix_cache()).result()
            results[f"{name} {label}"] = front.call(
                lambda e: measure(e, args.prompt_tokens, bystanders, args.seed)).result()
            print(name, label, json.dumps(results[f"{name} {label}"]), flush=True)
    traffic = make_requests(args.requests, model_config.vocab_size, args.seed)
    for round_ in range(args.rounds if args.requests else 0):  # interleaved: drift hits both policies alike
        for name, scheduling in policies.items():
            front.call(lambda e: setattr(e.scheduler, "config", scheduling)).result()
            row = run_engine(front, traffic, TRAFFIC_CONCURRENCY)[0].row()
            results.setdefault(f"{name} traffic", []).append(row)
            print(name, "traffic", round_, json.dumps(row), flush=True)
    front.shutdown()
    before, after = results["tokens beside"], results["step cost beside"]
    ratios = {label: round(results[f"step cost {label}"]["long_prompt_ttft_s"]
                           / results[f"tokens {label}"]["long_prompt_ttft_s"], 2) for label in ("beside", "alone")}
    results["ttft_step_cost_over_tokens"] = ratios
    print(f"bystanders' ITL p99 beside a {args.prompt_tokens}-token prefill / alone: tokens "
          f"{before['itl_p99_beside_over_alone']}x, step cost {after['itl_p99_beside_over_alone']}x (goal <= 3); "
          f"the long prompt's TTFT, step cost / tokens: {ratios['beside']}x beside them, {ratios['alone']}x alone")
    if args.requests:
        speed = {name: sum(r["output_tokens"] for r in results[f"{name} traffic"])
                 / sum(r["seconds"] for r in results[f"{name} traffic"]) for name in policies}
        results["traffic_tokens_per_s_step_cost_over_tokens"] = round(speed["step cost"] / speed["tokens"], 3)
        print(f"ordinary traffic ({args.requests} requests at c={TRAFFIC_CONCURRENCY}, {args.rounds} rounds each, "
              f"interleaved), output tokens/s step cost / tokens: "
              f"{results['traffic_tokens_per_s_step_cost_over_tokens']} (goal >= 0.97)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
