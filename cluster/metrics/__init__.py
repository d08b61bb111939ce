"""Metrics: vLLM's names for what vLLM measures, `moe_cluster_*` for experts, shards, units and GPUs (`names`),
recorded in the engine's process (`recorder`, `sampler`) into Ray's metrics or prometheus_client (`sink`)."""
