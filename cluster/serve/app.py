"""`build_app(args)`: the Ray Serve application of one or more serving units.

    Ingress (HTTP) -> AttentionRouter replicas (one per unit, engine + attention) -> ExpertShard actors

Started by `moe-cluster serve`, by `serve run cluster.serve.app:build_app model=DIR shards=4`, by a Serve config
file (deploy/serve_config.yaml) or by KubeRay's RayService, all through this one function.

Building the app needs no checkpoint: Serve builds it in a task that usually runs on the head, a node with no GPU
and no model volume. What Serve must reserve (a unit's GPU bundles, the replica counts) comes from the arguments
alone (`deployment_plan`); each replica reads config.json itself where it runs (`resolved.resolve_planned`), so the
checkpoint is needed only on the nodes that run replicas.

With `db` set, each Ingress replica opens the ledger itself (cluster.api.accounts); its PostgreSQL password is read
from MOE_CLUSTER_DB_PASSWORD in the replica's own environment (the pod's, from a k8s Secret), so it never enters the
Serve config or the runtime_env that Ray stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from cluster.serve.args import ServeArgs
from cluster.serve.ingress import Ingress
from cluster.serve.live import INGRESS_SETTINGS, ROUTER_SETTINGS, user_config
from cluster.serve.prefix_routing import prefix_router_options
from cluster.serve.resolved import planned_layout, resolved_device
from cluster.serve.router import AttentionRouter
from cluster.serve.unit import UNIT_ENV, replica_gpus, unit_bundles

MAX_ONGOING_REQUESTS = 1024  # the engine batches continuously; Serve must not cap it at its default of 5
CLUSTER_INGRESS_REPLICAS = 2  # one lost Ingress replica leaves another serving


@dataclass(frozen=True)
class DeploymentPlan:
    """The `.options(...)` of each deployment: what Serve reserves and how many replicas it keeps."""

    router: dict[str, Any]  # AttentionRouter: one replica per unit, its placement group the unit's bundles
    ingress: dict[str, Any]


def build_app(args: ServeArgs | dict) -> Application:
    return serve_app(decide(args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)))


def decide(args: ServeArgs, own_ray: bool = False) -> ServeArgs:
    """`args` with what depends on where the app is built decided, once: `device: auto` (GPUs when the Ray cluster
    has any: the builder itself may be a CPU-only head node; else this machine's choice) and the Ingress replicas
    (2 on a cluster; 1 on a Ray this process started for itself, where a second would add nothing)."""
    decided = {}
    if args.device == "auto":
        on_ray = ray.is_initialized()
        decided["device"] = (("cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu") if on_ray
                             else resolved_device(args))
    if args.ingress_replicas is None:
        decided["ingress_replicas"] = 1 if own_ray else CLUSTER_INGRESS_REPLICAS
    return args.model_copy(update=decided)


def deployment_plan(args: ServeArgs) -> DeploymentPlan:
    """What Serve is asked for, from `args` alone (decided: see `decide`)."""
    if args.device == "auto" or args.ingress_replicas is None:
        raise ValueError("deployment_plan needs decided arguments (cluster.serve.app.decide)")
    layout = planned_layout(args, args.device)
    # A replica Serve stops (scale-down, upgrade, a drained node) gets the shutdown grace for its requests in flight;
    # those still running then are severed.
    common = {"graceful_shutdown_timeout_s": args.shutdown_grace_s, "max_ongoing_requests": MAX_ONGOING_REQUESTS}
    # A data-parallel unit runs an engine per rank: it carries `attention_ranks` times one engine's requests.
    unit_requests = {"max_ongoing_requests": MAX_ONGOING_REQUESTS * args.attention_ranks}
    router = {
        "name": "AttentionRouter",
        **_unit_scaling(args),
        "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": replica_gpus(layout),
                              "runtime_env": {"env_vars": UNIT_ENV}},
        "placement_group_bundles": unit_bundles(args, layout),
        "placement_group_strategy": layout.strategy,
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        **prefix_router_options(args),  # requests sharing a prefix go to the unit that caches it
        "user_config": user_config(args, ROUTER_SETTINGS),  # live: cluster.serve.live
        **common,
        **unit_requests,
    }
    ingress_options: dict[str, Any] = {"num_cpus": args.ingress_cpus}
    if args.ingress_resource is not None:
        ingress_options["resources"] = {args.ingress_resource: 1}
    ingress = {"name": "Ingress", "num_replicas": args.ingress_replicas, "ray_actor_options": ingress_options,
               "user_config": user_config(args, INGRESS_SETTINGS), **common}
    return DeploymentPlan(router, ingress)


def _unit_scaling(args: ServeArgs) -> dict[str, Any]:
    """A fixed number of units, or Serve's autoscaling of them by ongoing requests per unit."""
    if args.max_units is None:
        return {"num_replicas": args.units}
    low = args.min_units or 1
    return {"autoscaling_config": {
        "min_replicas": low, "initial_replicas": low, "max_replicas": args.max_units,
        "target_ongoing_requests": args.target_ongoing_requests or args.max_num_seqs * args.attention_ranks,
        "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
    }}


def serve_app(args: ServeArgs) -> Application:
    """The deployments, each handed `args` (decided) to resolve where it runs."""
    plan = deployment_plan(args)
    router = serve.deployment(AttentionRouter).options(**plan.router).bind(args)
    return serve.deployment(Ingress).options(**plan.ingress).bind(router, args)
