"""The Mixtral / Mistral decoder-only transformer over a flat batch of tokens.

`CausalLM.moe_layers()` is the one way to the MoE blocks (and through them their expert executors) for whoever
needs them: attaching experts, warm-up, CUDA graphs' crossings, the engine's shard timings.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.config import ModelConfig
from cluster.model.attention import Attention
from cluster.model.kv_cache import KVCache
from cluster.model.layers import RMSNorm, SwiGLU
from cluster.model.moe import MoELayer
from cluster.moe.executor import ExpertExecutor


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Attribute names follow the HF checkpoint so non-expert tensors load by their own names.
        self.is_moe = config.is_moe
        if config.is_moe:
            self.block_sparse_moe = MoELayer(config.hidden_size, config.num_experts, config.experts_per_token, layer)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x, h = self.attend(x, positions, cache)
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return x + ffn(h)

    def attend(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to its feed-forward: (the residual after attention, the feed-forward's normed input), both
        [T, D]. Apart from `forward` so a decode step split before the experts computes the same."""
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x, self.post_attention_layernorm(x)


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Embeddings, decoder layers and lm_head; the experts are attached from outside (`attach_experts`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def moe_layers(self) -> list[MoELayer]:
        """The MoE blocks in layer order (empty for a dense model); each knows its layer index and executor."""
        return [layer.block_sparse_moe for layer in self.model.layers if layer.is_moe]

    def attach_experts(self, executor: ExpertExecutor) -> None:
        for moe in self.moe_layers():
            moe.executor = executor

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """input_ids [T], positions [T] -> final hidden states [T, D] (norm applied)."""
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, positions, cache)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] in fp32."""
        weight = self.lm_head.weight  # [V, D]
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            # [V, D] @ [D, N] streams the weight in its own layout, faster on CPU than F.linear's [N, D] @ [D, V]
            # for small N (benchmarks/RESULTS.md, "Figures behind design comments").
            return torch.mm(weight, hidden.t()).t().contiguous()
        return self.lm_head(hidden).float()
