"""Engine throughput and latency against transformers' static batching and the forward-only bound, side by side.

    python benchmarks/engine.py [--requests 256] [--concurrency 1 16 64] [--model DIR] [--device cpu|cuda]

One run, one process, the same seeded requests for every system:
  engine       the async engine (continuous batching, paged KV cache), clients keeping `c` requests in flight;
  transformers `MixtralForCausalLM.generate` on static, left-padded batches of 32 requests (greedy, no EOS);
  bound        the model runner alone, replaying the engine's own step shapes (same tokens per step, same context
               lengths, the same attention and graph paths) with no scheduler, sampler or detokenizer: a diagnostic
               of the host's share, not a ceiling (it is the project's own code).
  roofline     each of the engine's steps against the least the hardware allows for it (benchmarks/roofline.py:
               T_roof = max(bytes / read bandwidth, FLOPs / matmul peak), the ceilings measured first, on the device
               at hand), by step kind and size: T_roof / device time and device / wall time.
Prints output tokens/s, TTFT and inter-token latency p50/p99 per system, the roofline tables, and the ratios
engine/transformers, engine/roofline and engine/bound. Goal: engine >= 3x transformers at concurrency 64; the
roofline is the physical limit the GPU goals are read against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.checkpoint.weights import model_directory  # noqa: E402
from cluster.config import QUANTIZATIONS, ModelConfig, expert_quantization  # noqa: E402
from cluster.engine.async_engine import AsyncEngine  # noqa: E402
from cluster.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from cluster.engine.sampling_params import SamplingParams  # noqa: E402
from cluster.engine.warm_up import synthetic_step  # noqa: E402
from cluster.dtype import dtype_name, resolve_dtype  # noqa: E402
from cluster.model.loader import load_model  # noqa: E402
from ceilings import matmul_peak, median_timer, read_bandwidth  # noqa: E402  (benchmarks/ceilings.py)
from roofline import RooflineMeter, print_table, roofline_table  # noqa: E402  (benchmarks/roofline.py)


@dataclass
class Result:
    name: str
    output_tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def row(self) -> dict:
        return {"system": self.name, "output_tokens": self.output_tokens, "seconds": round(self.seconds, 2),
                "tokens_per_s": round(self.tokens_per_s, 1),
                "ttft_p50_ms": _ms(_pct(self.ttft, 50)), "ttft_p99_ms": _ms(_pct(self.ttft, 99)),
                "itl_p50_ms": _ms(_pct(self.itl, 50)), "itl_p99_ms": _ms(_pct(self.itl, 99))}


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def make_requests(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt, output length): prompts of 32..512 tokens, outputs of 16..256, all from one seed."""
    rng = random.Random(seed)  # not torch: this thread must not start an OpenMP pool (see AsyncEngine)
    lengths = [(rng.randint(32, 512), rng.randint(16, 256)) for _ in range(n)]
    return [([rng.randrange(3, vocab) for _ in range(p)], o) for p, o in lengths]


def run_engine(front: AsyncEngine, requests: list[tuple[list[int], int]], concurrency: int) -> tuple[Result, list]:
    """Clients keep `concurrency` requests in flight. Also returns the engine's step shapes for the bound."""
    steps: list[list[tuple[int, int, bool]]] = []
    engine = front.engine
    front.call(lambda e: e.blocks.reset_prefix_cache()).result()  # every run starts cold
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        steps.append([(s.seq.num_computed, s.num_new, s.samples) for s in out.scheduled])
        return out

    engine.scheduler.schedule = recording_schedule
    result = Result(f"engine c={concurrency}", 0, 0.0)

    async def client(i: int, prompt: list[int], max_tokens: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            start = time.perf_counter()
            last = None
            async for out in await front.add_request(str(i), prompt, params):
                now = time.perf_counter()
                if out.token_ids:
                    if last is None:
                        result.ttft.append(now - start)
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.output_tokens += len(out.token_ids)

    async def main() -> None:
        gate = asyncio.Semaphore(concurrency)
        await asyncio.gather(*(client(i, p, o, gate) for i, (p, o) in enumerate(requests)))

    t0 = time.perf_counter()
    try:
        asyncio.run(main())
    finally:
        engine.scheduler.schedule = schedule
    result.seconds = time.perf_counter() - t0
    return result, steps


@torch.inference_mode()
def run_bound(engine: LLMEngine, steps: list[list[tuple[int, int, bool]]], output_tokens: int,
              concurrency: int) -> Result:
    """Replay the step shapes through the engine's model runner: synthetic sequences with their own block tables
    and random token ids, every sampled row's logits reduced on the device, one sync per step as the engine."""
    runner, bs = engine.runner, engine.config.block_size
    vocab, num_blocks = engine.model.config.vocab_size, engine.blocks.num_blocks
    per_seq = num_blocks // max(len(s) for s in steps if s)
    rng = random.Random(0)
    batches = [synthetic_step(step, bs, per_seq, num_blocks, vocab, rng) for step in steps if step]  # not timed
    t0 = time.perf_counter()
    for batch in batches:
        logits, _ = runner.run(batch)
        logits.argmax(-1).tolist()
    return Result(f"bound c={concurrency}", output_tokens, time.perf_counter() - t0)


@torch.inference_mode()
def run_transformers(model_dir: Path, requests: list[tuple[list[int], int]], batch_size: int,
                     dtype: torch.dtype) -> Result:
    import transformers

    model = transformers.MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    result = Result(f"transformers b={batch_size}", 0, 0.0)

    class StepClock(transformers.LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        clock = StepClock()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=max(o for _, o in batch), do_sample=False,
                       logits_processor=transformers.LogitsProcessorList([clock]))
        for _, o in batch:  # each request's useful tokens are its own first `o`
            result.output_tokens += o
            result.ttft.append(clock.times[0] - start)
            result.itl += [clock.times[k] - clock.times[k - 1] for k in range(1, o)]
    result.seconds = time.perf_counter() - t0
    return result


def device_ceilings(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(read bytes/s, matmul FLOP/s in the engine's dtype) of the device the engine runs on."""
    bench = median_timer(device)
    small = device.type == "cpu"
    return (read_bandwidth(bench, device, 256 << 20 if small else 2 << 30),
            matmul_peak(bench, device, 2048 if small else 8192, dtype))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory, or with --load-format random a shape's name "
                                        "(default: the embedded mini checkpoint)")
    parser.add_argument("--load-format", choices=["safetensors", "random"], default="safetensors")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--hf-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="for every system alike; auto: bf16 on CUDA and on CPUs with AMX, else fp32")
    parser.add_argument("--moe-backend", choices=["auto", "cpu", "torch", "triton"], default="auto")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, help="fp8: the experts in FP8 (default: the "
                        "checkpoint's own)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    args.dtype = resolve_dtype(args.dtype, args.device)
    model_dir = model_directory(args.model, args.load_format)
    if args.load_format == "random" and not args.skip_transformers:
        parser.error("--load-format random has no checkpoint for transformers to read: add --skip-transformers")
    config = ModelConfig.from_file(model_dir)
    quantization = expert_quantization(config, args.quantization)
    decode, eos_id = text_decoder(config)
    engine_config = EngineConfig(max_num_seqs=max(args.concurrency), max_num_batched_tokens=args.max_num_batched_tokens)

    def build() -> LLMEngine:
        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_model(model_dir, args.dtype, args.device, args.moe_backend, load_format=args.load_format,
                           quantization=args.quantization).model
        return LLMEngine(model, decode, eos_id, engine_config)

    # All torch work (engine, bound, transformers) runs on the engine thread, one OpenMP pool for the process.
    front = AsyncEngine(build)
    requests = make_requests(args.requests, config.vocab_size, args.seed)
    threads = front.call(lambda e: torch.get_num_threads()).result()
    print(f"{len(requests)} requests, {sum(len(p) for p, _ in requests)} prompt and "
          f"{sum(o for _, o in requests)} output tokens; model {model_dir} in {dtype_name(args.dtype)}"
          f"{', experts in ' + quantization if quantization else ''}; torch threads {threads}",
          flush=True)

    read_bw, peak = front.call(lambda e: device_ceilings(e.device, e.model.lm_head.weight.dtype)).result()
    print(f"ceilings: read {read_bw / 1e9:.1f} GB/s, {dtype_name(args.dtype)} matmul {peak / 1e12:.2f} TFLOP/s",
          flush=True)
    rows: list[dict] = []
    engine_results: dict[int, Result] = {}
    bound_results: dict[int, Result] = {}
    roofline: dict[int, list[dict]] = {}
    for c in args.concurrency:
        meter = front.call(lambda e: RooflineMeter(e, quantization)).result()
        engine_results[c], steps = run_engine(front, requests, c)
        front.call(lambda e: meter.close()).result()
        roofline[c] = front.call(lambda e: roofline_table(meter.records(), read_bw, peak)).result()
        output_tokens = engine_results[c].output_tokens
        bound_results[c] = front.call(lambda e: run_bound(e, steps, output_tokens, c)).result()
        for r in (engine_results[c], bound_results[c]):
            rows.append(r.row())
            print(json.dumps(rows[-1]), flush=True)
    hf = None
    if not args.skip_transformers:
        hf = front.call(lambda e: run_transformers(model_dir, requests, args.hf_batch, e.model.lm_head.weight.dtype)
                        ).result()
        rows.append(hf.row())
        print(json.dumps(rows[-1]), flush=True)
    front.shutdown()

    print()
    header = f"{'system':<20}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}   (ms)"
    print(header)
    for row in rows:
        cells = [row[k] if row[k] is not None else "-" for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                                                                 "itl_p99_ms")]
        print(f"{row['system']:<20}{row['tokens_per_s']:>9}" + "".join(f"{c:>10}" if i < 2 else f"{c:>9}"
                                                                         for i, c in enumerate(cells)))
    print()
    for c in args.concurrency:
        print(f"roofline at c={c} (per step T_roof = max(bytes / read bandwidth, FLOPs / peak): "
              f"benchmarks/roofline.py)")
        print_table(roofline[c])
        print(f"c={c:<3} the engine's run took {engine_results[c].seconds:.2f} s for "
              f"{roofline[c][-1]['t_roof_ms'] / 1e3:.2f} s of T_roof: "
              f"{roofline[c][-1]['t_roof_ms'] / 1e3 / engine_results[c].seconds:.3f} of the roofline")
    print()
    for c in args.concurrency:
        ratio_bound = engine_results[c].tokens_per_s / bound_results[c].tokens_per_s
        line = f"c={c:<3} engine/bound = {ratio_bound:.2f} (a replay of the runner: a diagnostic, not a ceiling)"
        if hf:
            line += f"   engine/transformers = {engine_results[c].tokens_per_s / hf.tokens_per_s:.2f}"
        print(line)
    top = max(args.concurrency)
    if hf:
        print(f"goal at c={top}: engine/transformers >= 3: "
              f"{'PASS' if engine_results[top].tokens_per_s >= 3 * hf.tokens_per_s else 'FAIL'}")
    if args.out:
        rows.append({"roofline": {str(c): table for c, table in roofline.items()},
                     "ceilings": {"read_gbps": round(read_bw / 1e9, 1), "matmul_tflops": round(peak / 1e12, 2)}})
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def text_decoder(config: ModelConfig) -> tuple[Callable[[list[int]], str], int]:
    """(decode, eos id): the checkpoint's tokenizer, or token ids as text where mistral-common is not installed
    (the GPU check's machine); the benchmark ignores EOS either way."""
    try:
        from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version

        tok = load_tokenizer(resolve_tokenizer_version(config))
        return tok.decode, tok.eos_id
    except ImportError:
        return (lambda ids: "".join(f" {i}" for i in ids)), 2


if __name__ == "__main__":
    sys.exit(main())
