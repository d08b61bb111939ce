"""Settings that change on a running app without reloading anything: Serve's `user_config`, per deployment.

Serve versions an app's code by its `import_path`, `runtime_env` and `args`: any change to `args` restarts every
replica, and a unit's replica reloads its experts (~280 GB for 8x22B). What can change live is therefore taken out
of `args`' reach: each deployment's `user_config` (a deployment option of the Serve config, under `deployments:`)
goes to its replicas' `reconfigure()`, and a change to it reaches the running replicas without a restart. The
AttentionRouter's `autoscaling_config` is live the same way (Serve's own), and the keys' rate limits live in the
ledger (`moe-cluster keys`).

A `user_config` names only what it changes; each setting it leaves out keeps the value the app's `args` gave it, so
removing a line from the config restores that value. Each is validated as `ServeArgs` validates it. A refused one
(an unknown setting, a bad value) changes nothing: the replica logs why, keeps the settings it had (a new replica,
those of `args`) and reports the refusal in /health's stats. Serve would stop a replica whose reconfigure() raised,
and start its replacement with the same config: one typo would take every unit down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cluster.serve.args import ServeArgs

log = logging.getLogger(__name__)

# Read by the Ingress at each request: what a request costs, and what one request may send.
INGRESS_SETTINGS = frozenset({"price_input_per_million", "price_output_per_million", "max_body_bytes",
                              "body_timeout_s", "tokenize_budget_s"})
# The AttentionRouter's admission (how many sequences may wait beyond the running batch before a request gets 429)
# and how long a stream's outputs may gather before they cross to the Ingress.
ROUTER_SETTINGS = frozenset({"max_waiting", "stream_interval_s"})


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


@dataclass(frozen=True)
class Applied:
    args: ServeArgs  # the settings in effect
    refusal: str | None  # why the last user_config was refused; None when it was applied


def apply_user_config(built: ServeArgs, current: ServeArgs, settings: frozenset[str], config: dict[str, Any] | None,
                      deployment: str) -> Applied:
    """`config` applied over `built` (the app's args), or, when refused, `current` kept and the refusal logged."""
    try:
        return Applied(reconfigured(built, settings, config), None)
    except ValueError as e:  # pydantic's ValidationError among them
        refusal = f"the {deployment}'s user_config was refused, its settings are unchanged: {e}"
        log.error("%s", refusal)
        return Applied(current, refusal)
