"""Settings that change on a running app without reloading anything: Serve's `user_config`, per deployment.

Serve versions an app's code by its `import_path`, `runtime_env` and `args`: any change to `args` restarts every
replica, and a unit's replica reloads its experts (~280 GB for 8x22B). What can change live is therefore taken out
of `args`' reach: each deployment's `user_config` (a deployment option of the Serve config, under `deployments:`)
goes to its replicas' `reconfigure()`, and a change to it reaches the running replicas without a restart. The
AttentionRouter's `autoscaling_config` is live the same way (Serve's own), and the keys' rate limits live in the
ledger (`moe-cluster keys`).

A `user_config` names only what it changes; each setting it leaves out keeps the value the app's `args` gave it, so
removing a line from the config restores that value. Each is validated as `ServeArgs` validates it (a bad value
fails the deployment, and the replicas keep running with what they had).
"""

from __future__ import annotations

from typing import Any

from cluster.serve.args import ServeArgs

# Read by the Ingress at each request: what a request costs, and what one request may send.
INGRESS_SETTINGS = frozenset({"price_input_per_million", "price_output_per_million", "max_body_bytes",
                              "body_timeout_s", "tokenize_budget_s"})
# The AttentionRouter's admission: how many sequences may wait beyond the running batch before a request gets 429.
ROUTER_SETTINGS = frozenset({"max_waiting"})


def user_config(args: ServeArgs, settings: frozenset[str]) -> dict[str, Any]:
    """The deployment's `user_config` as `args` set it (what the app runs with until a config says otherwise)."""
    return args.model_dump(mode="json", include=set(settings))


def reconfigured(args: ServeArgs, settings: frozenset[str], config: dict[str, Any] | None) -> ServeArgs:
    """`args` (as the app was built with them) with `config`, a deployment's `user_config`, applied; raises
    ValueError naming a setting that is not live here, and pydantic's ValidationError for a bad value."""
    config = config or {}
    unknown = sorted(set(config) - settings)
    if unknown:
        raise ValueError(f"{unknown} cannot change on a running deployment here (the live settings are "
                         f"{sorted(settings)}); set them in the app's args, which restarts its replicas")
    return ServeArgs.model_validate({**args.model_dump(exclude_unset=True), **config})
