"""Tensor names of the HF Mixtral/Mistral layout and their expected shapes."""

from __future__ import annotations

from cluster.config import ModelConfig

EXPERT_PROJECTIONS = ("w1", "w2", "w3")


def expert_tensor(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"


def weight_scale(name: str) -> str:
    """The scale tensor beside an FP8 weight `X.weight` (vLLM's fp8 layout): `X.weight_scale`."""
    if not name.endswith(".weight"):
        raise ValueError(f"{name} is not a weight's name")
    return name + "_scale"


def expert_shape(config: ModelConfig, proj: str) -> tuple[int, int]:
    """w1, w3: [F, D]; w2: [D, F]."""
    f, d = config.intermediate_size, config.hidden_size
    return (d, f) if proj == "w2" else (f, d)


def dense_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor that is not an expert weight: embeddings, attention, norms, router gates or dense MLPs, lm_head."""
    d, f = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (config.q_size, d)
        shapes[f"{p}.self_attn.k_proj.weight"] = (config.kv_size, d)
        shapes[f"{p}.self_attn.v_proj.weight"] = (config.kv_size, d)
        shapes[f"{p}.self_attn.o_proj.weight"] = (d, config.q_size)
        if config.is_moe:
            shapes[f"{p}.block_sparse_moe.gate.weight"] = (config.num_experts, d)
        else:
            shapes[f"{p}.mlp.gate_proj.weight"] = (f, d)
            shapes[f"{p}.mlp.up_proj.weight"] = (f, d)
            shapes[f"{p}.mlp.down_proj.weight"] = (d, f)
    return shapes


def expert_tensor_shapes(config: ModelConfig, experts: list[int] | None = None) -> dict[str, tuple[int, int]]:
    experts = list(range(config.num_experts)) if experts is None else experts
    return {expert_tensor(i, e, p): expert_shape(config, p)
            for i in range(config.num_layers) for e in experts for p in EXPERT_PROJECTIONS}
