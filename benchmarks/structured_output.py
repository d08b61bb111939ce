"""Decode throughput with a JSON schema on every request, as a ratio to the same run without one.

    python benchmarks/structured_output.py [--rounds 5] [--concurrency 16] [--max-tokens 64] [--model DIR] [--quick]
                                           [--steered]

One process, the embedded `mini` checkpoint (or --model), one engine with its grammar guide, as the serving engine
builder makes it (CPU, fp32). Each round runs the same seeded prompts twice, with and without a `json_schema`
grammar (the order flips each round); `concurrency` clients keep a request each in flight. The schema asks for more
array items than `max_tokens` can hold, so guided requests run to `max_tokens` like the unguided ones (`ignore_eos`)
and both runs generate the same number of tokens. Prints the output tokens/s of each and the median of the rounds'
guided/unguided ratios. The goal is >= 0.9: computing masks must not serialize the step. Exits 1 below it (not in
--quick, a smoke test).

--steered: a schema whose required members fit in max_tokens, with free strings the random model fills, so every
guided request runs until the steering must close it (guided.py: its way to the end is checked at every token and
forced at the end); those requests finish with "stop" at about max_tokens.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llguidance  # noqa: E402

from cluster.checkpoint.default import ensure_default_checkpoint  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from cluster.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from cluster.engine.guided import GrammarGuide  # noqa: E402
from cluster.engine.sampling_params import SamplingParams  # noqa: E402
from cluster.model.loader import load_model  # noqa: E402
from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version  # noqa: E402

GOAL = 0.9
SCHEMA = {"type": "object", "required": ["city", "readings"], "additionalProperties": False,
          "properties": {"city": {"type": "string", "maxLength": 24},
                         "readings": {"type": "array", "minItems": 1000,
                                      "items": {"type": "object", "required": ["hour", "celsius"],
                                                "additionalProperties": False,
                                                "properties": {"hour": {"type": "integer", "minimum": 0,
                                                                        "maximum": 23},
                                                               "celsius": {"type": "number"}}}}}}


STEERED = {"type": "object", "required": ["city", "notes", "readings"], "additionalProperties": False,
           "properties": {"city": {"type": "string"}, "notes": {"type": "string"},
                          "readings": {"type": "array", "minItems": 3,
                                       "items": SCHEMA["properties"]["readings"]["items"]}}}


def run(engine: LLMEngine, prompts: list[list[int]], concurrency: int, params: SamplingParams,
        finishes: tuple[str, ...] = ("length",)) -> float:
    """Output tokens/s with `concurrency` requests in flight until all `prompts` are done; starts cold."""
    engine.blocks.reset_prefix_cache()
    pending = list(enumerate(prompts))
    in_flight = tokens = 0
    t0 = time.perf_counter()
    while pending or engine.has_work():
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, params)
            in_flight += 1
        for out in engine.step():
            if out.finished:
                tokens += out.completion_tokens
                in_flight -= 1
                if out.finish_reason not in finishes:
                    raise RuntimeError(f"request {out.request_id} ended with {out.finish_reason}, not {finishes}")
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded mini checkpoint)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round, c 4, 8 tokens; no verdict")
    p.add_argument("--steered", action="store_true", help="a schema the steering closes within max_tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.concurrency, args.max_tokens = 1, 4, 8

    model_dir = Path(args.model) if args.model else ensure_default_checkpoint("mini")
    config = ModelConfig.from_file(model_dir)
    version = resolve_tokenizer_version(config)
    tok = load_tokenizer(version)
    model = load_model(model_dir, torch.float32, "cpu", "auto").model
    engine = LLMEngine(model, tok.decode, tok.eos_id,
                       EngineConfig(kv_cache_bytes=256 * 2**20, max_num_seqs=args.concurrency),
                       GrammarGuide.for_tokenizer(version))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        STEERED if args.steered else SCHEMA,
        overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    finishes = ("length", "stop") if args.steered else ("length",)
    modes = {"json_schema": SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=args.seed,
                                           grammar=grammar),
             "free": SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=args.seed, ignore_eos=True)}
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(rng.randint(32, 128))]
               for _ in range(args.concurrency)]
    print(f"model {model_dir}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"c={args.concurrency}, {args.max_tokens} output tokens per request", flush=True)
    for params in modes.values():  # first-call costs out of the timed runs
        run(engine, prompts[:1], 1, SamplingParams(**{**params.__dict__, "max_tokens": 2}), ("length", "stop"))

    samples: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in (modes if r % 2 == 0 else list(modes)[::-1]):
            samples[m].append(run(engine, prompts, args.concurrency, modes[m], finishes))
            print(f"round {r + 1} {m:>11}: {samples[m][-1]:7.1f} tok/s", flush=True)

    per_round = [g / f for g, f in zip(samples["json_schema"], samples["free"])]
    ratio = statistics.median(per_round)
    print(f"\nmedians over {args.rounds} round(s): json_schema {statistics.median(samples['json_schema']):.1f} tok/s, "
          f"free {statistics.median(samples['free']):.1f} tok/s; json_schema/free {ratio:.2f} "
          f"(per-round {min(per_round):.2f}..{max(per_round):.2f}); goal >= {GOAL}")
    if args.quick:
        return 0
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
