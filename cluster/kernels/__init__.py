"""Expert kernels.

GPU: `align` groups (token, expert) pairs by local expert (torch, any device), `fused_moe` holds the raw Triton
kernels and their launchers, `tuning` picks block sizes. Importing this package does not import Triton.
CPU: `cpu/expert_ffn.c`, a packed-weight AVX2 kernel for a layer's experts, and `cpu/paged_attention.c`, decode
attention read straight from the paged KV cache; `cpu_build` builds both with the machine's C compiler on first use.
"""
