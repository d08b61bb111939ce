"""Shapes of the embedded random checkpoints: `tiny` for tests, `mini` for benchmarks."""

from __future__ import annotations

from cluster.config import ModelConfig

_COMMON = dict(vocab_size=32768, rope_theta=1e6, rms_norm_eps=1e-5, num_experts=8, experts_per_token=2,
               tokenizer_version="v3")

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        max_position_embeddings=4096, **_COMMON),
    "mini": ModelConfig(hidden_size=512, intermediate_size=1024, num_layers=8, num_heads=8, num_kv_heads=2,
                        head_dim=64, max_position_embeddings=65536, **_COMMON),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
