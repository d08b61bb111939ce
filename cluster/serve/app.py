"""`build_app(args)`: the Ray Serve application of one or more serving units.

    Ingress (HTTP) -> AttentionRouter replicas (one per unit, engine + attention) -> ExpertShard actors

Started by `moe-cluster serve`, by `serve run cluster.serve.app:build_app model=DIR shards=4`, by a Serve config
file (deploy/serve_config.yaml) or by KubeRay's RayService, all through this one function.

With `db` set, each Ingress replica opens the ledger itself (cluster.api.accounts); its PostgreSQL password is read
from MOE_CLUSTER_DB_PASSWORD in the replica's own environment (the pod's, from a k8s Secret), so it never enters the
Serve config or the runtime_env that Ray stores.
"""

from __future__ import annotations

import ray
from ray import serve
from ray.serve import Application

from cluster.serve.args import ServeArgs
from cluster.serve.ingress import Ingress
from cluster.serve.resolved import ResolvedArgs
from cluster.serve.router import AttentionRouter
from cluster.serve.unit import UNIT_ENV, replica_gpus, unit_bundles

MAX_ONGOING_REQUESTS = 1024  # the engine batches continuously; Serve must not cap it at its default of 5


def build_app(args: ServeArgs | dict) -> Application:
    return serve_app(resolve_on_cluster(args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)))


def resolve_on_cluster(args: ServeArgs) -> ResolvedArgs:
    """`args.resolve()`, where `device: auto` means GPUs when the Ray cluster has any (the driver itself may run on
    a CPU-only head node)."""
    if args.device == "auto" and ray.is_initialized():
        args = args.model_copy(update={"device": "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"})
    return args.resolve()


def serve_app(resolved: ResolvedArgs) -> Application:
    """The deployments, each handed `resolved` whole."""
    args, layout = resolved.args, resolved.layout
    router = serve.deployment(AttentionRouter).options(
        name="AttentionRouter",
        num_replicas=args.units,
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": replica_gpus(layout),
                           "runtime_env": {"env_vars": UNIT_ENV}},
        placement_group_bundles=unit_bundles(args, layout),
        placement_group_strategy=layout.strategy,
        max_ongoing_requests=MAX_ONGOING_REQUESTS,
        health_check_period_s=5,
        health_check_timeout_s=30,
    ).bind(resolved)
    ingress = serve.deployment(Ingress).options(
        name="Ingress", ray_actor_options={"num_cpus": args.ingress_cpus}, max_ongoing_requests=MAX_ONGOING_REQUESTS,
    )
    return ingress.bind(router, resolved)
