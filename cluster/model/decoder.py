"""The Mixtral / Mistral decoder-only transformer over a flat batch of tokens.

`CausalLM.moe_layers()` is the one way to the MoE blocks (and through them their expert executors) for whoever
needs them: attaching experts, warm-up, CUDA graphs' crossings, the engine's shard timings.

The forward carries the stream as a pair (x, residual), the stream being residual + x: each residual add happens in
the norm that follows it (`RMSNorm.add_forward`), which on CUDA is one fused kernel for both. On CPU the adds are the
same torch adds in the same order as `DecoderLayer.forward`'s, so the arithmetic is unchanged.
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
        """x [T, D] -> [T, D]: the stream after this layer."""
        x, h = self.attend(x, positions, cache)
        return x + self.feed_forward(h)

    def attend(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to its feed-forward: (the residual after attention, the feed-forward's normed input), both
        [T, D]. The layer's input is x, or residual + x when a residual is given (the previous layer's stream and
        feed-forward output, added in this layer's input norm). Apart from `forward` so a decode step split before
        the experts computes the same."""
        if residual is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm.add_forward(x, residual)
        h, x = self.post_attention_layernorm.add_forward(self.self_attn(h, positions, cache), x)
        return x, h

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, D], the normed input `attend` returns -> the feed-forward's output [T, D] (not yet added)."""
        return (self.block_sparse_moe if self.is_moe else self.mlp)(h)


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
        x, residual = self.run_layers(x, None, positions, cache, 0, len(self.model.layers))
        return self.final_norm(x, residual)

    def run_layers(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, cache: KVCache,
                   first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers [first, stop) over the stream residual + x (x alone when residual is None) -> the stream after
        them as (x, residual), both [T, D]: each layer's last add is left to the next norm."""
        for layer in self.model.layers[first:stop]:
            residual, h = layer.attend(x, positions, cache, residual)
            x = layer.feed_forward(h)
        return x, residual

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The final norm of the stream residual + x (x alone when residual is None) -> [T, D]."""
        return self.model.norm(x) if residual is None else self.model.norm.add_forward(x, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] in fp32."""
        weight = self.lm_head.weight  # [V, D]
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            # [V, D] @ [D, N] streams the weight in its own layout, faster on CPU than F.linear's [N, D] @ [D, V]
            # for small N (benchmarks/RESULTS.md, "Figures behind design comments").
            return torch.mm(weight, hidden.t()).t().contiguous()
        return self.lm_head(hidden).float()
