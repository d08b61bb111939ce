"""Raw kernels; the layers and backends that choose between them live in `cluster.moe` and `cluster.attention`.

GPU (Triton): `align` groups (token, expert) pairs by local expert (one Triton program; a torch reference),
`fused_moe` holds the grouped gate_up/down kernels and their launchers, `tuning` picks their block sizes,
`paged_attention` holds paged decode (split-K over the context), causal prefill and the KV write, `glue` a layer's
small ops fused (RMSNorm with its residual add, rotary on q and k, the router's top-k with its expert count; the
model's `glue_selector` picks them on CUDA). Importing this package does not import Triton.
CPU: `cpu/expert_ffn.c`, a packed-weight AVX2 kernel for a layer's experts, and `cpu/paged_attention.c`, decode
attention read straight from the paged KV cache; `cpu_build` builds both with the machine's C compiler on first use.
"""
