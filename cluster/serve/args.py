"""The serving unit's settings as given, validated: shared by `moe-cluster serve`, `serve run` configs and KubeRay.

Declarations only (pydantic, no torch): the command line builds its options from these fields. Deciding every
`auto` and reading the checkpoint is `cluster.serve.resolved`'s job."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from cluster.api.limits import APILimits
from cluster.engine.config import CPU_PREFILL_BUDGET_BESIDE_DECODES, EngineConfig
from cluster.ledger.pricing import Pricing, parse_dollars

# Chosen by measurement: benchmarks/RESULTS.md, "Stream batches across the Serve hop".
STREAM_INTERVAL_S = 0.05


class ServeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="checkpoint directory, or with --load-format random a shape's name ("
                                                "tiny, mini, mixtral-8x7b, mixtral-8x22b); default: the embedded mini "
                                                "checkpoint")
    load_format: Literal["safetensors", "random"] = Field(
        "safetensors", description="where the weights come from: the checkpoint's safetensors files, or random "
                                   "(seeded, made on each process's device: serves a shape before its weights arrive; "
                                   "the text is noise)")
    served_model_name: str | None = Field(None, description="the `model` name clients send; default: directory name")
    tokenizer: Literal["v1", "v2", "v3"] | None = Field(None, description="default: from the checkpoint")
    shards: int = Field(2, ge=0, description="expert shards of one unit (at most the number of experts; 0 for a "
                                            "dense model)")
    attention_ranks: int = Field(
        1, ge=1, description="data-parallel attention: ranks of one unit, each with its own requests and KV cache on "
                             "its own GPU and one shard of the experts (so `shards` must equal it), exchanging every "
                             "MoE layer's tokens; 1: one replica attends and drives `shards` expert shards")
    units: int = Field(1, ge=1, description="serving units (AttentionRouter replicas, each with its own shards), "
                                            "fixed; min_units/max_units instead autoscale them")
    min_units: int | None = Field(None, ge=1, description="autoscaling: the fewest units (default 1; with max_units)")
    max_units: int | None = Field(None, ge=1, description="autoscaling: the most units; set, Serve adds and "
                                                          "removes units by ongoing requests")
    target_ongoing_requests: int | None = Field(
        None, ge=1, description="autoscaling: the ongoing requests one unit should carry; default: max_num_seqs "
                                "(times attention_ranks: one engine per rank)")
    upscale_delay_s: float = Field(30.0, ge=0, description="autoscaling: how long load must stay high before a "
                                                            "unit is added")
    downscale_delay_s: float = Field(600.0, ge=0, description="autoscaling: how long load must stay low before a "
                                                               "unit is removed (slow: a unit reloads every expert)")
    ingress_replicas: int | None = Field(
        None, ge=1, description="Ingress (HTTP API) replicas; default: 2 on a cluster, so one lost replica "
                                "leaves another; 1 under `moe-cluster serve` on a Ray of its own (decided by "
                                "cluster.serve.app.decide)")
    ingress_resource: str | None = Field(
        None, min_length=1, description="a custom Ray resource each Ingress replica takes 1 of, to keep the "
                                        "replicas on the nodes that advertise it (on KubeRay: a CPU group, so they "
                                        "never hold a GPU node up); default: none, anywhere")
    gpus: int | None = Field(
        None, ge=1, description="GPUs of one unit on CUDA: `shards` (default; the replica shares GPU 0 with shard 0, "
                                "whose experts then run in the replica's process) or `shards` + 1 (the replica gets a "
                                "GPU of its own); as `moe-cluster plan --gpus`")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is visible (on Ray: "
                                                                      "when the cluster has GPUs when the app is "
                                                                      "built; set cuda where GPU nodes join later), "
                                                                      "else cpu")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs and on CPUs with AMX, else fp32 (see cluster/dtype.py)")
    quantization: Literal["fp8"] | None = Field(
        None, description="fp8: the experts held in FP8 with a scale per output channel (quantized as a bf16/fp32 "
                          "checkpoint loads; half the bytes a decode step reads; the CPU path dequantizes them per "
                          "call); default: the checkpoint's own (fp8 when its config.json declares it)")
    moe_backend: Literal["auto", "cpu", "torch", "triton"] = Field(
        "auto", description="the expert kernels; auto: triton on CUDA, the C kernel on x86 CPUs, else torch")
    attention_backend: Literal["auto", "triton", "cpu", "torch"] = Field(
        "auto", description="auto: triton on CUDA, the C decode kernel on x86 CPUs in fp32, else torch")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="capture decode steps in CUDA graphs per batch bucket (whole, or in pieces around "
                            "experts in other processes); auto: on for CUDA, never on CPU")
    async_scheduling: Literal["auto", "on", "off"] = Field(
        "auto", description="schedule and launch each engine step before the last one's tokens are read back, so "
                            "the host's work overlaps the device's; auto: on for CUDA (a CPU computes as it "
                            "launches, so there each output would only come a step later)")
    channel: Literal["auto", "shm", "gloo", "nccl"] = Field(
        "auto", description="the per-layer token channel; auto: shm when a unit shares one machine on CPU, "
                            "else gloo on CPU and NCCL on GPU")
    kv_cache_bytes: ByteSize | None = Field(None, gt=0, description="KV-cache memory, e.g. 2GB or 512MiB; default: "
                                                                     "1 GiB on CPU, 90% of free memory on GPU")
    max_num_seqs: int = Field(EngineConfig.max_num_seqs, ge=1, description="most sequences batched in one step")
    max_num_batched_tokens: int = Field(EngineConfig.max_num_batched_tokens, ge=16,
                                        description="most tokens one step computes (prefill chunks and decodes)")
    prefill_budget_beside_decodes: int | None = Field(
        None, ge=1, description="most a long prompt (more tokens to compute than max_num_batched_tokens) may add to "
                                "a step that also decodes, in tokens weighted by the context they attend to "
                                "(cluster/engine/step_cost.py): bounds what it adds to running streams' inter-token "
                                f"latency; default: {CPU_PREFILL_BUDGET_BESIDE_DECODES} on CPU, no cap on GPU")
    step_cost: Literal["auto", "flops", "measured"] = Field(
        "auto", description="how a prefill token's attention is priced against its weights in a step's budget: "
                            "flops (from the model's shape) or measured (prefill chunks timed at start, about a "
                            "second); auto: measured on CPU, flops on GPU")
    max_waiting: int = Field(EngineConfig.max_waiting, ge=0,
                             description="sequences that may wait beyond the max_num_seqs running; a request that "
                                         "arrives past that is refused at once with 429 and Retry-After")
    max_n: int = Field(EngineConfig.max_n, ge=1, description="most choices (`n`) one request may ask for (more: 400)")
    enable_prefix_caching: bool = Field(EngineConfig.enable_prefix_caching,
                                        description="reuse the KV of prompt prefixes that requests with the same "
                                                    "cache_salt computed; off: cached_tokens is always 0")
    prefix_routing: bool = Field(True, description="on Ray, with prefix caching: send each request to the unit "
                                                   "that last took the longest prefix of its prompt, unless that unit "
                                                   "is far busier than the least loaded "
                                                   "(cluster/serve/prefix_routing.py); off: Serve's power of two "
                                                   "choices")
    stream_interval_s: float = Field(
        STREAM_INTERVAL_S, ge=0, le=1,
        description="on Ray: a request's outputs that arrive within this long go to the Ingress as one message (its "
                    "first output at once, none held back longer); 0: one message per token")
    max_body_bytes: ByteSize = Field(ByteSize(APILimits.max_body_bytes), ge=1,
                                     description="largest request body, e.g. 4MiB; a larger one gets 413 before it is "
                                                 "read")
    body_timeout_s: float = Field(APILimits.body_timeout_s, gt=0,
                                  description="a body not fully received by then gets 408, and the connection closes")
    tokenize_budget_s: float = Field(APILimits.tokenize_budget_s, gt=0,
                                     description="longest a request's parsing and chat encoding may take once a thread "
                                                 "takes it up (400 past it), and longest it may wait for one (503)")
    tokenize_threads: int = Field(APILimits.tokenize_threads, ge=1,
                                  description="threads that parse and encode requests off the event loop, in each "
                                              "of two lanes: bodies up to 64 KiB, and larger ones")
    header_timeout_s: float = Field(APILimits.header_timeout_s, gt=0,
                                    description="--no-ray: a request head not complete this long after the connection "
                                                "opened (or the last response ended) gets 408, and the connection "
                                                "closes (on Ray: the proxy or ingress in front bounds it)")
    max_connections: int = Field(APILimits.max_connections, ge=1,
                                 description="--no-ray: open connections in all; past it a new one gets 503 and closes")
    max_connections_per_client: int = Field(
        APILimits.max_connections_per_client, ge=0,
        description="--no-ray: open connections from one client address (0: no cap); past it a new one gets 429 and "
                    "closes. Behind a proxy every connection comes from its address: raise it or set 0")
    replica_cpus: float = Field(0.5, gt=0, description="Ray CPUs reserved for the AttentionRouter replica")
    shard_cpus: float = Field(0.25, gt=0, description="Ray CPUs reserved for each expert shard")
    ingress_cpus: float = Field(0.1, gt=0, description="Ray CPUs reserved for each Ingress replica")
    shard_threads: int | None = Field(None, ge=1, description="torch threads per CPU shard; default: cores / shards")
    step_timeout_s: float = Field(120.0, gt=0, description="longest wait for a layer's replies from the shards; "
                                                            "a shard that misses it is restarted")
    recovery_timeout_s: float = Field(600.0, gt=0, description="how long a unit may take to bring a shard back")
    shutdown_grace_s: float = Field(30.0, gt=0, description="on SIGTERM/SIGINT: how long running requests may take "
                                                             "to finish before they are ended with an error")
    db: str | None = Field(None, description="the keys and credits ledger: sqlite:///path.db, a file path, or "
                                             "postgresql://user@host:port/db (the password from "
                                             "$MOE_CLUSTER_DB_PASSWORD, never in the URL); default: none, the API is "
                                             "open to anyone")
    price_input_per_million: str = Field("2", description="dollars charged per million prompt tokens (with --db)")
    price_output_per_million: str = Field("6", description="dollars charged per million completion tokens "
                                                           "(with --db)")
    reservation_ttl_s: float = Field(900.0, gt=0, description="how long a request's credit reservation lives: one "
                                                              "left open by a stopped server is released after it")

    @field_validator("price_input_per_million", "price_output_per_million")
    @classmethod
    def _check_price(cls, price: str) -> str:
        if parse_dollars(price) < 0:
            raise ValueError(f"a price must be >= 0, not {price}")
        return price

    @field_validator("db")
    @classmethod
    def _check_db(cls, db: str | None) -> str | None:
        """A password in the URL would travel in the Serve config (Ray stores it) and show in `ps`: it comes from
        $MOE_CLUSTER_DB_PASSWORD (a k8s Secret) instead."""
        if db is not None and urlsplit(db).password is not None:
            raise ValueError("the ledger URL must not hold a password: set $MOE_CLUSTER_DB_PASSWORD instead")
        return db

    @model_validator(mode="after")
    def _check_scaling(self) -> "ServeArgs":
        if self.max_units is None:
            if self.min_units is not None or self.target_ongoing_requests is not None:
                raise ValueError("min_units and target_ongoing_requests need max_units (autoscaling)")
        elif "units" in self.model_fields_set:
            raise ValueError("units is a fixed count: give min_units/max_units to autoscale, not both")
        elif (self.min_units or 1) > self.max_units:
            raise ValueError(f"min_units={self.min_units} is above max_units={self.max_units}")
        return self

    @property
    def pricing(self) -> Pricing:
        return Pricing(parse_dollars(self.price_input_per_million), parse_dollars(self.price_output_per_million))
