"""Start-up warm-up: every decode split count the Triton attention can pick and every M bucket of the experts run
once before serving, and the synthetic steps leave the engine's results unchanged."""

import pytest
import torch

import cluster.attention.triton_backend as triton_attention
from cluster.engine.model_runner import ModelRunner
from cluster.engine.paged_cache import PagedKVCache
from cluster.engine.warm_up import WARM_UP_STEPS, warm_up
from cluster.kernels.paged_attention import decode_split_counts
from cluster.model.loader import load_model
from cluster.moe.triton_backend import TritonMoEBackend


@pytest.mark.e2e  # the whole model on the Triton path
def test_warm_up_compiles_every_split_count_and_bucket(tiny_dir, device, monkeypatch):
    lm = load_model(tiny_dir, "fp32", device, "triton")
    cache = PagedKVCache(lm.config, 64, 16, torch.float32, device, backend="triton")
    runner = ModelRunner(lm.model, cache)
    splits, buckets, steps = [], [], []
    real_decode, real_warm_up, real_run = triton_attention.paged_decode, TritonMoEBackend.warm_up, runner.run

    def decode(*args, **kwargs):
        splits.append(args[7])
        return real_decode(*args, **kwargs)

    def moe_warm_up(self, weights, max_tokens, **kwargs):
        buckets.append(max_tokens)
        return real_warm_up(self, weights, max_tokens, **kwargs)

    def run(batch):
        steps.append(tuple(s.num_new for s in batch.scheduled))
        return real_run(batch)

    monkeypatch.setattr(triton_attention, "paged_decode", decode)
    monkeypatch.setattr(TritonMoEBackend, "warm_up", moe_warm_up)
    monkeypatch.setattr(runner, "run", run)
    warm_up(runner, 48, num_blocks=64)
    counts = list(decode_split_counts(lm.config.num_kv_heads, runner.max_blocks, 16, cache.backend.num_sms))
    assert splits[:len(counts)] == counts  # the backend's warm-up, before any step
    assert buckets == [48]  # the tiny model's experts share one shape: one layer warmed, up to the token budget
    assert steps == [tuple(n for _, n, _ in shapes) for shapes in WARM_UP_STEPS]
