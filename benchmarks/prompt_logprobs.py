"""What scoring prompts costs the engine: prefill time with `prompt_logprobs` as a ratio to the same prefill without.

    python benchmarks/prompt_logprobs.py [--rounds 5] [--prompts 4] [--prompt-len 1024] [--top 5] [--model DIR]

One process, the embedded `mini` checkpoint (or --model), one engine (CPU fp32 unless CUDA is there), prefix caching
off so both runs compute every prompt token. Each round runs the same seeded prompts twice, with and without
`prompt_logprobs=top` (max_tokens 0, what lm-eval's loglikelihood asks; the order flips each round), and prints each
run's prompt tokens/s and the median of the rounds' scored/plain time ratios. Scoring puts every prompt row through
the lm_head (a V x D matmul a row) besides the forward, so the ratio grows as the model's layers shrink against its
vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.checkpoint.default import ensure_default_checkpoint  # noqa: E402
from cluster.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from cluster.engine.sampling_params import SamplingParams  # noqa: E402
from cluster.model.loader import load_model  # noqa: E402
from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version  # noqa: E402


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> float:
    """Seconds to compute (and score) every prompt, all admitted at once."""
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_work():
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.model or ensure_default_checkpoint("mini"), "bf16" if device == "cuda" else "fp32",
                        device=device)
    tok = load_tokenizer(resolve_tokenizer_version(loaded.config))
    engine = LLMEngine(loaded.model, tok.decode, tok.eos_id, EngineConfig(enable_prefix_caching=False))
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, loaded.config.vocab_size, (args.prompts, args.prompt_len), generator=gen).tolist()
    plain = SamplingParams(max_tokens=0, temperature=0)
    scored = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=args.top)
    run(engine, prompts[:1], scored)  # warm: first-use costs out of the rounds
    times: dict[str, list[float]] = {"scored": [], "plain": []}
    for r in range(args.rounds):
        order = [("scored", scored), ("plain", plain)]
        for name, params in order if r % 2 == 0 else order[::-1]:
            times[name].append(run(engine, prompts, params))
    tokens = args.prompts * args.prompt_len
    for name, seconds in times.items():
        print(f"{name}: {tokens / statistics.median(seconds):.0f} prompt tokens/s (median of {args.rounds})")
    ratios = [s / p for s, p in zip(times["scored"], times["plain"])]
    print(f"scored/plain time: median {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}..{max(ratios):.2f})")


if __name__ == "__main__":
    main()
