"""`EngineConfig`: the engine's settings, apart from the engine so that settings files and the command line read
them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: 1 GiB on CPU, `gpu_memory_utilization` of free memory on a GPU
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    # Admission (enforced by `AsyncEngine`, the serving front): sequences that may wait beyond the `max_num_seqs`
    # running before new requests are refused with 429. Two default batches of queue: the last one admitted starts
    # within about two request lifetimes; past that a client does better to retry (or go elsewhere) than to wait.
    max_waiting: int = 128
    # Most choices (`n`) per request: each choice is a sequence, so 16 lets one request fill at most a quarter of
    # the default batch (OpenAI itself allows 128, which the API's schema keeps as the absolute bound).
    max_n: int = 16
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # see `cluster.attention.selector`
    cuda_graphs: bool = False  # capture decode steps per batch bucket (CUDA only; see `cluster.engine.cuda_graphs`)
