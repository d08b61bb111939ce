"""Builds the engine a unit runs: the dense model here, experts behind whatever executor the mode provides."""

from __future__ import annotations

from cluster.checkpoint.progress import ProgressCallback
from cluster.checkpoint.weights import open_weights
from cluster.engine.engine import LLMEngine
from cluster.engine.guided import GrammarGuide
from cluster.model.loader import load_dense, load_experts
from cluster.moe.backend import get_backend
from cluster.moe.executor import ExpertExecutor, LocalExpertExecutor
from cluster.parallel.dispatch import ExpertParallelExecutor
from cluster.parallel.in_process import InProcessTransport
from cluster.parallel.placement import expert_owners
from cluster.parallel.shard_worker import ShardWorker
from cluster.serve.resolved import ResolvedArgs
from cluster.tokenizer import load_tokenizer


def build_engine(resolved: ResolvedArgs, executor: ExpertExecutor | None,
                 progress: ProgressCallback | None = None) -> LLMEngine:
    """Loads everything but the experts onto the unit's device; `executor` runs the experts (None for a dense
    model)."""
    r = resolved
    model = load_dense(open_weights(r.model_dir, r.args.load_format), r.config, r.dtype, r.device, progress)
    if r.config.is_moe:
        if executor is None:
            raise ValueError("a mixture-of-experts model needs an expert executor")
        model.attach_experts(executor)
    tok = load_tokenizer(r.tokenizer_version)
    return LLMEngine(model, tok.decode, tok.eos_id, r.engine, GrammarGuide.if_installed(r.tokenizer_version))


def in_process_executor(resolved: ResolvedArgs, progress: ProgressCallback | None = None) -> ExpertExecutor | None:
    """Single-process mode: one shard worker per shard group in this process, behind the in-process transport; on
    a GPU every expert behind one local executor (one device has nothing to split, and its decode steps can be
    captured in CUDA graphs), which the engine warms up."""
    r = resolved
    if r.num_shards == 0:
        return None
    if r.device == "cuda":
        layers = load_experts(open_weights(r.model_dir, r.args.load_format), r.config, r.dtype, r.device,
                              progress=progress, quantization=r.quantization)
        return LocalExpertExecutor(layers, r.config.num_experts, get_backend(r.moe_backend, r.device))
    workers = [ShardWorker.load(r.model_dir, r.config, group, r.dtype, r.device, r.moe_backend, progress,
                                r.args.load_format, r.quantization) for group in r.shard_groups]
    return ExpertParallelExecutor(InProcessTransport(workers), expert_owners(r.shard_groups))
