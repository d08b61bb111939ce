"""Paged attention: the step's layout (`metadata`), the backends that attend over the paged KV cache, and the
chooser (`selector`). The cache itself (storage and the per-step KV write) is `cluster.engine.paged_cache`.

Backends: `triton` (CUDA; graph-safe: reads only device tensors and shapes), `cpu` (the C decode kernel for CPU fp32
decodes, torch for prefill chunks), `torch` (grouped gathers and SDPA; the fallback, and the reference the others are
held to). Importing this package does not import Triton.
"""
