"""Every metric the service exports: its name, kind, labels and buckets, in one place for both sinks.

vLLM's names (v1 engine) for what vLLM also measures, so the dashboards, alerts and autoscaler triggers operators
already run keep working; `moe_cluster_*` for what only this system knows (expert routing, shard round trips, unit
state, GPUs). Every metric carries `model_name` (the served model name) before its own labels; vLLM's also carry
`engine`, as vLLM labels each series with the engine that recorded it: this system runs one engine per process that
records (an AttentionRouter replica, or the single process), see below.

What a scraper sees (`scraped_base`):
- single process (`moe-cluster serve --no-ray`, GET /metrics): the names as written here, e.g.
  `vllm:generation_tokens_total`, `vllm:time_to_first_token_seconds_bucket`, `moe_cluster_expert_tokens_total`,
  vLLM's with `engine="0"` (`SINGLE_PROCESS_ENGINE`: its one engine).
- on Ray (each node's metrics agent, the `metrics` port): Ray refuses ':' in names and prefixes `ray_`, so
  `ray_vllm_generation_tokens_total`, `ray_vllm_time_to_first_token_seconds_bucket`,
  `ray_moe_cluster_expert_tokens_total`. Ray adds its own labels (WorkerId, NodeAddress, SessionName, Component,
  Version). Its histograms' `_sum` is estimated from bucket midpoints (Ray's OpenTelemetry export keeps bucket counts
  only); `_count` and the buckets are exact. k8s/monitoring's PodMonitor renames them back on scrape (`ray_vllm_X` to
  `vllm:X`, `ray_moe_cluster_X` to `moe_cluster_X`) and sets `engine` on vLLM's to the replica's Ray `WorkerId`
  (one worker process per replica, so one engine), so Prometheus holds the single process's names in both modes.
Counters get `_total`; histograms `_bucket`, `_sum` and `_count` (vLLM's histogram `vllm:iteration_tokens_total`
has `_total` in its own name: `vllm:iteration_tokens_total_bucket`, as vLLM exports it). `vllm:cache_config_info`
is an info metric as vLLM writes one: a gauge at 1 whose labels hold the KV cache's configuration.

Semantics. A request with n choices is n sequences in the engine, as vLLM forks n child requests: the latency
histograms, `request_success` and `request_generation_tokens` count each choice; `prompt_tokens` and
`request_prompt_tokens` count a request's prompt once (so `prompt_tokens` adds up to the responses' usage
`prompt_tokens`, and `generation_tokens` to their `completion_tokens`); `num_requests_running` / `_waiting` count
sequences. A choice's time to first token is observed at its first token, its other latencies and generated-token
count when it ends; a choice that ends in an error records none of those, only `request_success{finished_reason=
"error"}` (a failure's times say nothing of the service's speed; the tokens it generated before still count in
`generation_tokens`). A request refused before it ran counts only in
`moe_cluster_requests_refused`.

Buckets. vLLM's histograms use vLLM's (v1) buckets, so the `le` values a vLLM dashboard or alert selects exist here
and `sum by (le)` across this service and vLLM servers adds like buckets (an extra bucket in one source would skew
the quantiles of the sum): time to first token, inter-token and per-output-token times, the request phases, n and
the iteration tokens exactly; the token counts vLLM builds 1-2-5 up to the model's context, here up to the largest
context of the models served (8x22B's), so a model with a smaller context has a bucket more at the top. The price:
vLLM's smallest inter-token bucket is 10 ms and its request buckets start at 0.3 s, so faster gaps and phases fall in
the first bucket. `moe_cluster_*`'s buckets (shard rounds, finer) are this project's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

# vLLM's buckets (see the module's doc). Seconds from arrival to a choice's first token (queueing and prefill).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
# Seconds between two tokens of a choice, and a choice's mean gap.
TOKEN_GAP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0)
# Whole requests and their phases (queue, prefill, decode, inference).
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
# Token counts: 1-2-5 up to the largest context of the models served (65536).
MAX_CONTEXT = 65536
TOKEN_COUNT_BUCKETS = tuple(float(m * 10 ** e) for e in range(6) for m in (1, 2, 5) if m * 10 ** e <= MAX_CONTEXT)
N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)
# Tokens one engine step computes (vLLM's buckets without CUDA graphs).
ITERATION_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0)
# The cache settings `vllm:cache_config_info` carries as labels: vLLM's names for the ones this engine has.
CACHE_CONFIG_LABELS = ("block_size", "cache_dtype", "enable_prefix_caching", "gpu_memory_utilization",
                       "num_gpu_blocks")
# Seconds of one round to the expert shards (in this process or over a channel).
ROUND_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)
# vLLM's label of the engine a series came from (after model_name), and its value in the single process.
ENGINE_LABEL = "engine"
SINGLE_PROCESS_ENGINE = "0"


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as the single process exports it (counters without `_total`)
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()  # beyond model_name
    buckets: tuple[float, ...] = ()  # histograms only

    @property
    def label_names(self) -> tuple[str, ...]:
        """The labels a recorder binds, in order (a sink may add `engine`: `exposed_label_names`)."""
        return ("model_name", *self.labels)

    @property
    def per_engine(self) -> bool:
        """vLLM's metrics, which carry `engine` as vLLM's do."""
        return self.name.startswith("vllm:")

    @property
    def exposed_label_names(self) -> tuple[str, ...]:
        """The labels of GET /metrics: `label_names` with `engine` after model_name on vLLM's metrics."""
        return ("model_name", ENGINE_LABEL, *self.labels) if self.per_engine else self.label_names

    @property
    def ray_name(self) -> str:
        """The name handed to `ray.util.metrics` (Ray exports it with `ray_` before it)."""
        return self.name.replace(":", "_")

    def scraped_base(self, ray: bool) -> str:
        """The name a scraper sees before any `_total` / `_bucket` / `_sum` / `_count`."""
        return f"ray_{self.ray_name}" if ray else self.name

    def scraped_names(self, ray: bool) -> tuple[str, ...]:
        base = self.scraped_base(ray)
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


# -- vLLM's --------------------------------------------------------------------------------------------------------
RUNNING = MetricSpec("vllm:num_requests_running", "gauge", "Sequences in the engine's running batch.")
WAITING = MetricSpec("vllm:num_requests_waiting", "gauge", "Sequences waiting to be scheduled (choices of n > 1 not "
                     "yet admitted included).")
KV_CACHE_USAGE = MetricSpec("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage: the fraction of blocks held by "
                            "sequences (1 = full).")
PREFIX_CACHE_QUERIES = MetricSpec("vllm:prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix "
                                  "cache, once per admission.")
PREFIX_CACHE_HITS = MetricSpec("vllm:prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache.")
PREEMPTIONS = MetricSpec("vllm:num_preemptions", "counter", "Sequences preempted (their KV freed, recomputed later).")
PROMPT_TOKENS = MetricSpec("vllm:prompt_tokens", "counter", "Prompt tokens of requests whose prefill finished.")
GENERATION_TOKENS = MetricSpec("vllm:generation_tokens", "counter", "Tokens generated (the usage completion_tokens).")
REQUEST_SUCCESS = MetricSpec("vllm:request_success", "counter", "Finished sequences (choices), by finish reason.",
                             ("finished_reason",))
REQUEST_PROMPT_TOKENS = MetricSpec("vllm:request_prompt_tokens", "histogram", "Prompt tokens per request.",
                                   buckets=TOKEN_COUNT_BUCKETS)
REQUEST_GENERATION_TOKENS = MetricSpec("vllm:request_generation_tokens", "histogram", "Generated tokens per choice.",
                                       buckets=TOKEN_COUNT_BUCKETS)
REQUEST_PARAMS_N = MetricSpec("vllm:request_params_n", "histogram", "The n parameter of requests.", buckets=N_BUCKETS)
REQUEST_PARAMS_MAX_TOKENS = MetricSpec("vllm:request_params_max_tokens", "histogram", "The max_tokens of requests.",
                                       buckets=TOKEN_COUNT_BUCKETS)
TTFT = MetricSpec("vllm:time_to_first_token_seconds", "histogram", "Time from arrival to a choice's first token.",
                  buckets=TTFT_BUCKETS)
ITL = MetricSpec("vllm:inter_token_latency_seconds", "histogram", "Time between consecutive tokens of a choice.",
                 buckets=TOKEN_GAP_BUCKETS)
TPOT = MetricSpec("vllm:request_time_per_output_token_seconds", "histogram",
                  "A choice's decode time per token after its first.", buckets=TOKEN_GAP_BUCKETS)
E2E = MetricSpec("vllm:e2e_request_latency_seconds", "histogram", "Time from arrival to a choice's end.",
                 buckets=REQUEST_BUCKETS)
QUEUE = MetricSpec("vllm:request_queue_time_seconds", "histogram", "Time from arrival to a choice's first step.",
                   buckets=REQUEST_BUCKETS)
INFERENCE = MetricSpec("vllm:request_inference_time_seconds", "histogram", "Time from a choice's first step to its "
                       "end.", buckets=REQUEST_BUCKETS)
PREFILL = MetricSpec("vllm:request_prefill_time_seconds", "histogram", "Time from a choice's first step to its first "
                     "token.", buckets=REQUEST_BUCKETS)
DECODE = MetricSpec("vllm:request_decode_time_seconds", "histogram", "Time from a choice's first token to its end.",
                    buckets=REQUEST_BUCKETS)
ITERATION_TOKENS = MetricSpec("vllm:iteration_tokens_total", "histogram", "Tokens each engine step computed (prompt "
                              "chunks and decoded tokens).", buckets=ITERATION_BUCKETS)
CACHE_CONFIG_INFO = MetricSpec("vllm:cache_config_info", "gauge", "The KV cache's configuration, as labels (always "
                               "1; num_gpu_blocks counts the cache's blocks on whatever device holds it).",
                               CACHE_CONFIG_LABELS)

# -- this system's -------------------------------------------------------------------------------------------------
REQUESTS_REFUSED = MetricSpec("moe_cluster_requests_refused", "counter", "Requests the engine's process refused "
                              "before they ran, by HTTP status: 400 invalid for this engine, 429 over capacity, 503 "
                              "serving unit unavailable.", ("status",))
EXPERT_TOKENS = MetricSpec("moe_cluster_expert_tokens", "counter", "Tokens the router sent to each expert of each "
                           "layer.", ("layer", "expert"))
EXPERT_ROUND = MetricSpec("moe_cluster_expert_round_seconds", "histogram", "Host-side time of one layer's round to "
                          "the expert shards in an engine step (with shards in this process on a GPU, the launch "
                          "time).", buckets=ROUND_BUCKETS)
SHARD_ROUND_TRIP = MetricSpec("moe_cluster_shard_round_trip_seconds", "histogram", "A one-token round to one expert "
                              "shard alone, probed between steps only while the engine is idle (no sequence running "
                              "or waiting): the shards' round trip without load.", ("shard",), ROUND_BUCKETS)
UNIT_STATE = MetricSpec("moe_cluster_unit_state", "gauge", "1 for the serving unit's current state, 0 for the others "
                        "(a replica still loading its unit exports nothing yet).", ("state",))
UNIT_RECOVERIES = MetricSpec("moe_cluster_unit_recoveries", "counter", "Times the serving unit brought its expert "
                             "shards back.")
GPU_MEMORY_USED = MetricSpec("moe_cluster_gpu_memory_used_bytes", "gauge", "GPU memory in use (NVML).",
                             ("gpu", "gpu_uuid"))
GPU_MEMORY_TOTAL = MetricSpec("moe_cluster_gpu_memory_total_bytes", "gauge", "GPU memory (NVML).",
                              ("gpu", "gpu_uuid"))
GPU_UTILIZATION = MetricSpec("moe_cluster_gpu_utilization_ratio", "gauge", "Fraction of the last sample period a "
                             "kernel ran on the GPU (NVML).", ("gpu", "gpu_uuid"))

UNIT_STATES = ("ok", "recovering", "failed")  # metrics start once the unit has loaded: never "starting"
FINISH_REASONS = ("stop", "length", "abort", "error")
REFUSAL_STATUSES = ("400", "429", "503")

ALL: tuple[MetricSpec, ...] = (
    RUNNING, WAITING, KV_CACHE_USAGE, PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, PREEMPTIONS, PROMPT_TOKENS,
    GENERATION_TOKENS, REQUEST_SUCCESS, REQUEST_PROMPT_TOKENS, REQUEST_GENERATION_TOKENS, REQUEST_PARAMS_N,
    REQUEST_PARAMS_MAX_TOKENS, TTFT, ITL, TPOT, E2E, QUEUE, INFERENCE, PREFILL, DECODE, ITERATION_TOKENS,
    CACHE_CONFIG_INFO,
    REQUESTS_REFUSED, EXPERT_TOKENS, EXPERT_ROUND, SHARD_ROUND_TRIP, UNIT_STATE, UNIT_RECOVERIES, GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL, GPU_UTILIZATION,
)
