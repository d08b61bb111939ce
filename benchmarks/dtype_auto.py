"""fp32 against bf16 through the engine, side by side, and whether `--dtype auto` picks the faster one here.

    python benchmarks/dtype_auto.py [--rounds 5] [--concurrency 1 64] [--max-tokens 64] [--model DIR] [--quick]

One process, the embedded `mini` checkpoint (or --model), one engine per dtype built as the serving engine builds it
(dense model and local experts on the CPU, each dtype with the attention and MoE backends `auto` gives it). The
dtypes take turns in every round (the order flips each round) on the same seeded prompts, greedy with `ignore_eos`
and a fixed `max_tokens`, so both do the same work; at concurrency `c`, `c` clients keep a request each in flight.
Prints each dtype's output tokens/s per concurrency (median over rounds), the median of the rounds' fp32/bf16
ratios (each round's pair ran back to back, under the same load), and the dtype `auto` picks. Exits 1 if `auto`
picks the dtype with the lower ratio at some concurrency (not in --quick, a smoke test).
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

from cluster.checkpoint.default import ensure_default_checkpoint  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from cluster.dtype import cpu_has_amx, dtype_name, parse_dtype, resolve_dtype  # noqa: E402
from cluster.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from cluster.engine.sampling_params import SamplingParams  # noqa: E402
from cluster.model.loader import load_model  # noqa: E402
from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version  # noqa: E402

DTYPES = ("fp32", "bf16")
KV_CACHE_BYTES = 256 * 2**20  # per engine: two live at once; ample for 64 requests of the lengths used here


def build_engine(model_dir: Path, config: ModelConfig, dtype: torch.dtype, max_num_seqs: int) -> LLMEngine:
    """As `cluster.serve.engine_builder` on one CPU process with local experts: auto backends for this dtype."""
    model = load_model(model_dir, dtype, "cpu", "auto").model
    tok = load_tokenizer(resolve_tokenizer_version(config))
    return LLMEngine(model, tok.decode, tok.eos_id,
                     EngineConfig(kv_cache_bytes=KV_CACHE_BYTES, max_num_seqs=max_num_seqs))


def backends(engine: LLMEngine) -> str:
    """The kernels this dtype gets: the C kernels run fp32 only, and hand other dtypes to torch."""
    executor = engine.model.model.layers[0].block_sparse_moe.executor
    moe = executor.backend
    experts = moe.name if moe.supports(executor.layers[0]) else f"torch (the {moe.name} backend's fallback)"
    return f"attention {engine.runner.cache.backend.name}, experts {experts}"


def make_prompts(n: int, vocab: int, seed: int, lengths: tuple[int, int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def run(engine: LLMEngine, prompts: list[list[int]], concurrency: int, max_tokens: int) -> float:
    """Output tokens/s with `concurrency` requests in flight until all `prompts` are done; starts cold."""
    engine.blocks.reset_prefix_cache()  # the same prompts again must not hit the previous run's blocks
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    pending = list(enumerate(prompts))
    in_flight = tokens = 0
    t0 = time.perf_counter()
    while pending or engine.has_work():
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, params)
            in_flight += 1
        for out in engine.step():
            tokens += len(out.token_ids)
            in_flight -= out.finish_reason is not None
    seconds = time.perf_counter() - t0
    if tokens != len(prompts) * max_tokens:
        raise RuntimeError(f"expected {len(prompts) * max_tokens} output tokens, got {tokens}")
    return tokens / seconds


def slower_levels(ratios: dict[int, float], auto: str) -> list[int]:
    """Concurrencies at which `auto`'s choice lost (ratios: concurrency -> fp32/bf16 tokens/s)."""
    return [c for c, ratio in ratios.items() if (ratio < 1 if auto == "fp32" else ratio > 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded mini checkpoint)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--requests", type=int, default=2, help="requests per run at concurrency 1 (else c requests)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round, c 1 and 4, 4 tokens; no verdict")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.concurrency, args.requests, args.max_tokens = 1, [1, 4], 1, 4
    prompt_lengths = (8, 16) if args.quick else (32, 128)

    model_dir = Path(args.model) if args.model else ensure_default_checkpoint("mini")
    config = ModelConfig.from_file(model_dir)
    auto = dtype_name(resolve_dtype("auto", "cpu"))
    print(f"model {model_dir}; torch {torch.__version__}, {torch.get_num_threads()} threads; AMX: {cpu_has_amx()}; "
          f"auto on cpu -> {auto}", flush=True)
    engines = {d: build_engine(model_dir, config, parse_dtype(d), max(args.concurrency)) for d in DTYPES}
    for d, engine in engines.items():
        print(f"{d}: {backends(engine)}", flush=True)
    prompts = {c: make_prompts(args.requests if c == 1 else c, config.vocab_size, args.seed + c, prompt_lengths)
               for c in args.concurrency}
    for engine in engines.values():  # first-call costs out of the timed runs
        run(engine, prompts[args.concurrency[0]][:1], 1, 2)

    samples: dict[str, dict[int, list[float]]] = {d: {c: [] for c in args.concurrency} for d in DTYPES}
    for r in range(args.rounds):
        order = DTYPES if r % 2 == 0 else DTYPES[::-1]
        for c in args.concurrency:
            for d in order:
                samples[d][c].append(run(engines[d], prompts[c], c, args.max_tokens))
                print(f"round {r + 1} c={c:<3} {d}: {samples[d][c][-1]:7.1f} tok/s", flush=True)

    # Each round's pair ran back to back, so its ratio sees the same machine load: the verdict uses their median.
    per_round = {c: [f / b for f, b in zip(samples["fp32"][c], samples["bf16"][c])] for c in args.concurrency}
    ratios = {c: statistics.median(per_round[c]) for c in args.concurrency}
    print(f"\nmedians over {args.rounds} round(s), {args.max_tokens} output tokens per request:")
    print(f"{'c':>4}{'fp32 tok/s':>12}{'bf16 tok/s':>12}{'fp32/bf16':>11}   (per-round ratio range)")
    for c in args.concurrency:
        fp32, bf16 = statistics.median(samples["fp32"][c]), statistics.median(samples["bf16"][c])
        spread = f"({min(per_round[c]):.2f}..{max(per_round[c]):.2f})"
        print(f"{c:>4}{fp32:>12.1f}{bf16:>12.1f}{ratios[c]:>11.2f}   {spread}")
    slower = slower_levels(ratios, auto)
    print(f"auto picks {auto}: " + (f"SLOWER at c={slower}" if slower else "the faster one at every concurrency"))
    if args.quick:
        return 0
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
