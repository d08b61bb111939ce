"""`EngineConfig`: the engine's settings, apart from the engine so that settings files and the command line read
them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

CPU_PREFILL_BUDGET_BESIDE_DECODES = 96


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: 1 GiB on CPU, `gpu_memory_utilization` of free memory on a GPU
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    # The cost (`cluster.engine.step_cost`: tokens weighted by the context they attend to) a long prompt, one with
    # more tokens to compute than a step holds, may add to a step that also decodes: bounds what it adds to running
    # streams' inter-token latency. None: CPU_PREFILL_BUDGET_BESIDE_DECODES on a CPU, where a 1,024-token chunk takes ~20x a
    # small decode step; no cap on a GPU, where decodes are bound by memory and a chunk's compute mostly overlaps them.
    prefill_budget_beside_decodes: int | None = None
    # How a token's attention is priced against its weights (`break_even`): "flops" from the model's shape,
    # "measured" by timing two prefill chunks when the engine starts (`cluster.engine.cost_probe`).
    step_cost: str = "flops"
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
    # Schedule and launch each step before reading the last one's tokens back, so the host's work overlaps the
    # device's (`LLMEngine._step`). None: on a GPU. A CPU computes as it launches, so there it would only hand each
    # output out one step later.
    async_scheduling: bool | None = None
