"""Live settings on a running Serve app (cluster/serve/live.py), deployed from a config the way KubeRay deploys one:
a new price, body limit, admission bound and stream interval under `deployments:` reach the running replicas
through `reconfigure()`, a refused config changes nothing, and no process restarts (the Ingress, the AttentionRouter
and its expert shard keep their process ids)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.ledger import Pricing, open_ledger
from cluster.ledger.pricing import parse_dollars
from cluster.serve.local_ray import APP_NAME
from tests.waiting import wait_until

CHAT = {"messages": [{"role": "user", "content": "Combien coûte ceci ?"}], "temperature": 0, "max_tokens": 8}
BEFORE = {"price_input_per_million": "2", "price_output_per_million": "6"}
AFTER = {"price_input_per_million": "40", "price_output_per_million": "120", "max_body_bytes": "2KiB"}
ROUTER_BEFORE = {"max_waiting": 64}
ROUTER_AFTER = {"max_waiting": 32, "stream_interval_s": 0.02}
# Refused: a misspelled setting (the Ingress), a value ServeArgs refuses (the AttentionRouter).
TYPO, BAD = {"price_input_per_milion": "9"}, {"max_waiting": -1}


def _config(tiny_dir: Path, db: Path, port: int, ingress: dict[str, Any], router: dict[str, Any]) -> dict[str, Any]:
    return {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "cluster.serve.app:build_app",
            "args": {"model": str(tiny_dir), "shards": 1, "dtype": "fp32", "kv_cache_bytes": 2**24, "device": "cpu",
                     "ingress_replicas": 1, "shard_cpus": 0.5, "db": str(db)},
            "deployments": [{"name": "Ingress", "user_config": ingress},
                            {"name": "AttentionRouter", "user_config": router}],
        }],
    }


def _processes() -> dict[str, int]:
    """The app's live actors (Serve replicas and expert shards) -> their process ids, from the GCS's actor table."""
    from ray._private.state import actors

    alive = actors(actor_state_name="ALIVE").values()
    return {info["ActorID"]: info["Pid"] for info in alive
            if info["ActorClassName"].startswith(f"ServeReplica:{APP_NAME}:") or info["ActorClassName"] == "ExpertShard"}


def _usage(db: Path, key_id: str) -> list[tuple[int, int, int]]:
    """(prompt tokens, completion tokens, cost) of each of the key's settled requests, newest first."""
    async def rows() -> list[tuple[int, int, int]]:
        ledger = open_ledger(str(db))
        try:
            return [(r.prompt_tokens, r.completion_tokens, r.cost_micro) for r in await ledger.usage(key_id)]
        finally:
            await ledger.close()
    return asyncio.run(rows())


def _settled(db: Path, key_id: str, count: int) -> tuple[int, int, int]:
    """The newest settlement, once the key has `count` of them (a request settles as its response ends)."""
    rows = wait_until(lambda: r if len(r := _usage(db, key_id)) >= count else None, 30,
                      f"{count} settled requests")
    return rows[0]


def _price(config: dict[str, str]) -> Pricing:
    return Pricing(parse_dollars(config["price_input_per_million"]), parse_dollars(config["price_output_per_million"]))


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str, str]:
    db = tmp_path / "ledger.db"

    async def create() -> tuple[str, str]:
        ledger = open_ledger(str(db))
        try:
            record, secret = await ledger.create_key("live", credits_micro=10**9)
            return record.key_id, secret
        finally:
            await ledger.close()
    key_id, secret = asyncio.run(create())
    return db, key_id, secret


def test_a_new_price_and_limit_reach_the_running_app_without_a_restart(local_ray, tiny_dir, key):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from cluster.parallel.channel import free_port

    db, key_id, secret = key
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = _get_global_client()
    headers = {"Authorization": f"Bearer {secret}"}
    try:
        client.deploy_apps(ServeDeploySchema.model_validate(_config(tiny_dir, db, port, BEFORE, ROUTER_BEFORE)), _blocking=True)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers=headers) as http:
            large = {**CHAT, "max_tokens": 1, "user": "x" * 3000}  # a body over 2 KiB
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            prompt, completion, cost = _settled(db, key_id, 1)
            assert cost == _price(BEFORE).cost(prompt, completion) > 0
            assert http.post("/v1/chat/completions", json=large).status_code == 200
            before = _processes()
            assert len(before) == 3  # the Ingress, the AttentionRouter, its one shard

            client.deploy_apps(ServeDeploySchema.model_validate(_config(tiny_dir, db, port, AFTER, ROUTER_AFTER)))
            # The new body limit is the sign the replica took the new settings (earlier probes may still pass).
            wait_until(lambda: http.post("/v1/chat/completions", json=large).status_code == 413, 60,
                       "the new max_body_bytes")
            settled = len(_usage(db, key_id))
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            prompt, completion, cost = _settled(db, key_id, settled + 1)
            assert cost == _price(AFTER).cost(prompt, completion) > _price(BEFORE).cost(prompt, completion)
            stats = http.get("/health").json()["stats"]
            assert {k: stats[k] for k in ROUTER_AFTER} == ROUTER_AFTER and "settings_refused" not in stats
            assert _processes() == before  # nothing restarted, nothing reloaded

            # A refused config: every replica keeps what it had and keeps serving; the AttentionRouter says why.
            client.deploy_apps(ServeDeploySchema.model_validate(_config(tiny_dir, db, port, TYPO, BAD)))
            refusal = wait_until(lambda: http.get("/health").json()["stats"].get("settings_refused"), 60,
                                 "the refusal in /health")
            assert "max_waiting" in refusal
            stats = wait_until(lambda: (h := http.get("/health").json()["stats"]).get("ingress_settings_refused")
                               and h, 60, "the Ingress's refusal in /health")
            assert "price_input_per_milion" in stats["ingress_settings_refused"]
            assert {k: stats[k] for k in ROUTER_AFTER} == ROUTER_AFTER
            settled = len(_usage(db, key_id))
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            prompt, completion, cost = _settled(db, key_id, settled + 1)
            assert cost == _price(AFTER).cost(prompt, completion)  # the Ingress refused the typo: AFTER's price
            assert http.post("/v1/chat/completions", json=large).status_code == 413
            assert _processes() == before
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()


def test_a_user_config_applies_over_the_args_and_a_refused_one_keeps_the_settings():
    from cluster.serve.args import ServeArgs
    from cluster.serve.live import INGRESS_SETTINGS, ROUTER_SETTINGS, apply_user_config, reconfigured

    built = ServeArgs(price_input_per_million="3", max_waiting=9)
    # Only what it names changes; what it leaves out keeps the args' value (removing a line restores it).
    assert reconfigured(built, ROUTER_SETTINGS, {"max_waiting": 4}).max_waiting == 4
    assert reconfigured(built, INGRESS_SETTINGS, {}).price_input_per_million == "3"
    assert reconfigured(built, INGRESS_SETTINGS, None) == built
    current = reconfigured(built, INGRESS_SETTINGS, {"price_input_per_million": "5"})
    for config in ({"max_num_seqs": 4}, {"price_input_per_million": "-1"}, {"max_body_bytes": "lots"}):
        applied = apply_user_config(built, current, INGRESS_SETTINGS, config, "Ingress")
        assert applied.args == current and applied.refusal is not None, config
        assert next(iter(config)) in applied.refusal
    applied = apply_user_config(built, current, INGRESS_SETTINGS, {"price_output_per_million": "7"}, "Ingress")
    assert applied.refusal is None and applied.args.price_output_per_million == "7"
    assert applied.args.price_input_per_million == "3"  # the args', not the current's
