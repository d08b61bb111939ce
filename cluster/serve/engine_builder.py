"""Builds the engine a unit runs: the dense model here, experts behind whatever executor the mode provides."""

from __future__ import annotations

from cluster.checkpoint.progress import ProgressCallback
from cluster.checkpoint.reader import CheckpointReader, parse_dtype
from cluster.config import ModelConfig
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.model.loader import load_dense, load_experts
from cluster.moe.backend import get_backend
from cluster.moe.executor import ExpertExecutor, LocalExpertExecutor
from cluster.parallel.dispatch import ExpertParallelExecutor
from cluster.parallel.in_process import InProcessTransport
from cluster.parallel.placement import assign_experts, expert_owners
from cluster.parallel.shard_worker import ShardWorker
from cluster.serve.args import ServeArgs
from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version


def build_engine(args: ServeArgs, device: str, executor: ExpertExecutor | None,
                 progress: ProgressCallback | None = None) -> LLMEngine:
    """Loads everything but the experts onto `device`; `executor` runs the experts (None for a dense model)."""
    directory = args.model_dir()
    config = ModelConfig.from_file(directory)
    model = load_dense(CheckpointReader(directory), config, parse_dtype(args.resolved_dtype(device)), device, progress)
    if config.is_moe:
        if executor is None:
            raise ValueError("a mixture-of-experts model needs an expert executor")
        model.attach_experts(executor)
    tok = load_tokenizer(resolve_tokenizer_version(config, args.tokenizer))
    engine_config = EngineConfig(kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                 attention_backend=args.attention_backend,
                                 cuda_graphs=args.resolved_cuda_graphs(device))
    return LLMEngine(model, tok.decode, tok.eos_id, engine_config)


def in_process_executor(args: ServeArgs, device: str,
                        progress: ProgressCallback | None = None) -> ExpertExecutor | None:
    """Single-process mode: `args.shards` shard workers in this process, behind the in-process transport; on a GPU
    every expert behind one local executor (one device has nothing to split, and its decode steps can be captured
    in CUDA graphs), which the engine warms up."""
    directory = args.model_dir()
    config = ModelConfig.from_file(directory)
    shards = args.num_shards(config)
    if shards == 0:
        return None
    if device == "cuda":
        layers = load_experts(CheckpointReader(directory), config, parse_dtype(args.resolved_dtype(device)), device,
                              progress=progress)
        return LocalExpertExecutor(layers, config.num_experts, get_backend(args.moe_backend, device))
    groups = assign_experts(config.num_experts, shards)
    dtype = args.resolved_dtype(device)
    workers = [ShardWorker.load(directory, g, dtype, device, args.moe_backend, progress) for g in groups]
    return ExpertParallelExecutor(InProcessTransport(workers), expert_owners(groups))
