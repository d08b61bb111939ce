"""The engine on a GPU, for the GPU check: throughput against the roofline (benchmarks/roofline.py) and against its
own forward-only replay, kernel launches per decode step, CUDA-graph outputs against eager ones, and greedy tokens
against CPU fp32.

Runs without Ray or mistral-common: the model is loaded in this process (experts on the Triton backend behind the
local executor) and driven by the async engine of `benchmarks/engine.py`. A dry run does the same on the CPU with
the Triton interpreter and the `tiny` checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from pathlib import Path

import torch

from cluster.checkpoint.presets import preset
from cluster.checkpoint.weights import shape_directory
from cluster.checkpoint.writer import write_random_checkpoint
from cluster.config import ModelConfig
from cluster.dtype import resolve_dtype
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.cuda_graphs import decode_buckets
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.model.loader import load_model
from cluster.parallel.dispatch import ExpertParallelExecutor
from cluster.parallel.in_process import InProcessTransport
from cluster.parallel.placement import assign_experts, expert_owners
from cluster.parallel.shard_worker import ShardWorker
from cluster.user_cache import cache_root, private_directory
from engine import Result, device_ceilings, make_requests, run_bound, run_engine, text_decoder
from roofline import RooflineMeter, roofline_table

CONCURRENCY = 64
GPU_REQUESTS = 128  # prompts of 32..512 tokens, outputs of 16..256: about 17K output tokens
GPU_KV_BYTES = 16 * 2**30


def checkpoint(name: str) -> Path:
    """A random checkpoint of the preset `name` in the HF layout, written once per machine."""
    target = private_directory(cache_root() / "gpu-check") / name  # the user's checked cache, not a shared /tmp
    if not (target / "config.json").is_file():
        print(f"   writing the {name} checkpoint to {target}", flush=True)
        write_random_checkpoint(target, preset(name), seed=0)
    return target


def model_source(name: str) -> tuple[Path, str]:
    """(directory, load format) of a model the check runs: a preset (`tiny`, `mini`) from a checkpoint written
    here (the safetensors path); `PRESET-Nlayers` (e.g. `mixtral-8x7b-2layers`) from random weights made on the
    device (no 93 GB file: the GPU machine's disk could not hold one)."""
    if m := re.fullmatch(r"(.+)-(\d+)layers", name):
        return shape_directory(name, dataclasses.replace(preset(m[1]), num_layers=int(m[2]))), "random"
    return checkpoint(name), "safetensors"


def device_and_dtype(dry_run: bool) -> tuple[str, str]:
    return ("cpu", "fp32") if dry_run else ("cuda", "bf16")


def build(model_dir: Path, device: str, dtype: str, cuda_graphs: bool, max_num_seqs: int = CONCURRENCY,
          moe_backend: str = "triton", attention: str = "auto", shards: int = 0, load_format: str = "safetensors",
          kv_cache_bytes: int | None = None) -> LLMEngine:
    """shards > 0: the experts split over that many shard workers behind the expert-parallel executor, as a unit
    drives them, in this process (so decode graphs are captured piecewise around each layer's experts).
    kv_cache_bytes None: GPU_KV_BYTES on a GPU, 256 MiB on the CPU."""
    config = ModelConfig.from_file(model_dir)
    decode, eos_id = text_decoder(config)
    model = load_model(model_dir, dtype, device, moe_backend, load_format=load_format).model
    if shards:
        groups = assign_experts(config.num_experts, shards)
        workers = [ShardWorker.load(model_dir, config, g, resolve_dtype(dtype, device), device, moe_backend,
                                    load_format=load_format) for g in groups]
        model.attach_experts(ExpertParallelExecutor(InProcessTransport(workers), expert_owners(groups)))
    if kv_cache_bytes is None:
        kv_cache_bytes = GPU_KV_BYTES if device == "cuda" else 2**28
    # No prefix cache: a prompt run twice (eager, then graphs) must be computed the same way both times.
    engine_config = EngineConfig(max_num_seqs=max_num_seqs, cuda_graphs=cuda_graphs, attention_backend=attention,
                                 kv_cache_bytes=kv_cache_bytes, enable_prefix_caching=False)
    return LLMEngine(model, decode, eos_id, engine_config)


def set_graphs(engine: LLMEngine, on: bool) -> None:
    """Graph mode: decode steps padded to buckets over static buffers, replayed from CUDA graphs where captured (on
    the CPU the same padded path, eagerly). Off: every step eager over exactly its own rows."""
    runner = engine.runner
    runner.decode_buckets = decode_buckets(engine.config.max_num_seqs) if on else ()
    runner.use_graphs = on and runner.graphs is not None


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Every prompt at once, greedy, EOS ignored: each one's tokens."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[str(i)] for i in range(len(prompts))]


def launches_per_decode_step(engine: LLMEngine, batch: int) -> dict:
    """Kernel and graph launches (CUDA API calls) of one decode step of `batch` sequences, with graphs as the
    engine has them; the same step eager for comparison. None on CPU (nothing is launched)."""
    if engine.device.type != "cuda":
        return {"graphs": None, "eager": None}
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 1000) for _ in range(8)] for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    counts = {}
    for mode in ("graphs", "eager"):
        set_graphs(engine, mode == "graphs")
        ids = [f"{mode}-{i}" for i in range(batch)]
        for request_id, p in zip(ids, prompts):
            engine.add_request(request_id, p, params)
        while any(not engine.requests[r][0].output for r in ids):  # prefills, chunked as the budget allows
            engine.step()
        engine.step()  # every sequence decodes from here on: one warm decode step, then the counted one
        counts[mode] = _count_launches(engine.step)
        for request_id in ids:
            engine.abort(request_id)
    set_graphs(engine, True)
    return counts


def _count_launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")
    return sum(e.count for e in prof.key_averages() if e.key in names)


def run(name: str, dry_run: bool, shards: int = 0) -> dict:
    """shards > 0: experts behind the expert-parallel executor (piecewise graphs), see `build`."""
    device, dtype = device_and_dtype(dry_run)
    model_dir, load_format = model_source(name)
    config = ModelConfig.from_file(model_dir)
    result: dict = {"model": name, "device": device, "dtype": dtype, "shards": shards}
    front = graph_mode_engine(result, lambda: build(model_dir, device, dtype, cuda_graphs=device == "cuda",
                                                    attention="triton", shards=shards, load_format=load_format))
    rng = random.Random(1)
    count, new_tokens = (3, 4) if dry_run else (8, 16)  # the interpreter runs a tiny step in about 0.3 s
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(rng.randint(5, 60))] for _ in range(count)]

    def eager_and_graph(e: LLMEngine) -> dict:
        set_graphs(e, False)
        eager = greedy_tokens(e, prompts, new_tokens)
        set_graphs(e, True)
        replayed = greedy_tokens(e, prompts, new_tokens)
        e.async_scheduling = False
        other = greedy_tokens(e, prompts, new_tokens)  # graphs, each step handed out before the next is scheduled
        e.async_scheduling = True
        same = sum(a == b for a, b in zip(eager, replayed))
        return {"sequences_equal": same, "sequences": len(prompts),
                "async_equal_in_series": sum(a == b for a, b in zip(replayed, other))}

    front.call(lambda e: setattr(e, "async_scheduling", True)).result()  # the default on a GPU; the CPU's too here
    result["eager_vs_graphs"] = front.call(eager_and_graph).result()
    result["launches_per_decode_step"] = front.call(lambda e: launches_per_decode_step(e, CONCURRENCY)).result()

    requests = make_requests(4 if dry_run else GPU_REQUESTS, config.vocab_size, seed=0)
    if dry_run:
        requests = [(p[:24], min(o, 4)) for p, o in requests]
    concurrency = 2 if dry_run else CONCURRENCY
    read_bw, peak = front.call(lambda e: device_ceilings(e.device, e.model.lm_head.weight.dtype)).result()
    served, roofline, steps = metered_run(front, requests, concurrency, read_bw, peak)
    bound = front.call(lambda e: run_bound(e, steps, served.output_tokens, concurrency)).result()
    result["in_series"] = in_series_run(front, requests, concurrency, read_bw, peak, served)
    front.shutdown()
    ratio = served.tokens_per_s / bound.tokens_per_s
    of_roof = roofline[-1]["t_roof_ms"] / 1e3 / served.seconds
    result.update(concurrency=concurrency, engine=served.row(), bound=bound.row(), engine_over_bound=round(ratio, 3),
                  roofline=roofline, engine_of_roofline=round(of_roof, 3),
                  ceilings={"read_gbps": round(read_bw / 1e9, 1), "matmul_tflops": round(peak / 1e12, 1)})
    launches = result["launches_per_decode_step"]
    result["headline"] = (f"{result['graphs']}: {served.tokens_per_s:.0f} tok/s at c={concurrency}, "
                          f"{of_roof:.2f} of the roofline (T_roof/device {roofline[-1]['roof_over_device']}, "
                          f"device/wall {roofline[-1]['device_over_wall']}), {ratio:.2f} of the bound; "
                          f"launches/step {launches['graphs']} (eager {launches['eager']}); "
                          f"graph==eager {result['eager_vs_graphs']['sequences_equal']}/{len(prompts)}")
    result["headline"] += (f"; scheduled ahead {result['in_series']['ahead_over_in_series']}x the tok/s of in "
                           f"series (ITL p50 {result['in_series']['itl_p50_ms']} ms in series)")
    checks = result["eager_vs_graphs"]
    result["passed"] = checks["sequences_equal"] == checks["async_equal_in_series"] == len(prompts)
    return result


def in_series_run(front: AsyncEngine, requests: list[tuple[list[int], int]], concurrency: int, read_bw: float,
                  peak: float, ahead: Result) -> dict:
    """The same run with each step handed out before the next is scheduled (`async_scheduling` off), against
    `ahead`, the run with steps scheduled ahead."""
    front.call(lambda e: setattr(e, "async_scheduling", False)).result()
    try:
        served, roofline, _ = metered_run(front, requests, concurrency, read_bw, peak)
    finally:
        front.call(lambda e: setattr(e, "async_scheduling", True)).result()
    return {**served.row(), "device_over_wall": roofline[-1]["device_over_wall"],
            "ahead_over_in_series": round(ahead.tokens_per_s / served.tokens_per_s, 3)}


def graph_mode_engine(result: dict, make: Callable[[], LLMEngine]) -> AsyncEngine:
    """The async engine over `make()`, its decode steps in graph mode; result["graphs"] names its graphs."""
    def build_in_graph_mode() -> LLMEngine:
        engine = make()
        result["graphs"] = type(engine.runner.graphs).__name__ if engine.runner.graphs else "none"
        set_graphs(engine, True)  # on the CPU: the padded static-buffer path that graphs replay on a GPU
        return engine

    return AsyncEngine(build_in_graph_mode)


def metered_run(front: AsyncEngine, requests: list[tuple[list[int], int]], concurrency: int, read_bw: float,
                peak: float) -> tuple[Result, list[dict], list]:
    """The engine serving `requests` with `concurrency` clients, under the roofline meter: (its result, the
    roofline table, its step shapes)."""
    meter = front.call(RooflineMeter).result()
    served, steps = run_engine(front, requests, concurrency)
    front.call(lambda e: meter.close()).result()
    roofline = front.call(lambda e: roofline_table(meter.records(), read_bw, peak)).result()
    return served, roofline, steps


def compare_with_cpu(dry_run: bool) -> dict:
    """Greedy tokens of `tiny` in fp32: this device (Triton kernels, graphs) against the CPU's default path."""
    device = "cpu" if dry_run else "cuda"
    model_dir = checkpoint("tiny")
    config = ModelConfig.from_file(model_dir)
    rng = random.Random(2)
    count, new_tokens = (3, 6) if dry_run else (8, 32)
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(rng.randint(5, 80))] for _ in range(count)]
    engine = build(model_dir, device, "fp32", cuda_graphs=device == "cuda", max_num_seqs=8, attention="triton")
    set_graphs(engine, True)
    here = greedy_tokens(engine, prompts, new_tokens)
    cpu = greedy_tokens(build(model_dir, "cpu", "fp32", cuda_graphs=False, max_num_seqs=8, moe_backend="auto"),
                        prompts, new_tokens)
    same = sum(a == b for a, b in zip(here, cpu))
    first_diff = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(here, cpu)]
    result = {"device": device, "sequences_equal": same, "sequences": len(prompts), "first_difference": first_diff,
              "headline": f"{same}/{len(prompts)} greedy sequences equal to CPU fp32"}
    result["passed"] = same == len(prompts)
    return result
