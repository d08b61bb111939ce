"""Named model shapes: `tiny` (tests) and `mini` (benchmarks, the embedded default), written as random checkpoints;
`mixtral-8x7b` and `mixtral-8x22b`, the released models' shapes, for random weights made on the device
(`--load-format random`) and for plans."""

from __future__ import annotations

from cluster.config import ModelConfig

_COMMON = dict(vocab_size=32768, rope_theta=1e6, rms_norm_eps=1e-5, num_experts=8, experts_per_token=2,
               tokenizer_version="v3")

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        max_position_embeddings=4096, **_COMMON),
    "mini": ModelConfig(hidden_size=512, intermediate_size=1024, num_layers=8, num_heads=8, num_kv_heads=2,
                        head_dim=64, max_position_embeddings=65536, **_COMMON),
    "mixtral-8x7b": ModelConfig(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                                num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
                                **{**_COMMON, "vocab_size": 32000, "tokenizer_version": "v1"}),
    "mixtral-8x22b": ModelConfig(hidden_size=6144, intermediate_size=16384, num_layers=56, num_heads=48,
                                 num_kv_heads=8, head_dim=128, max_position_embeddings=65536, **_COMMON),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
