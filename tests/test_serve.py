"""The Serve app end to end over HTTP on a local Ray: Ingress -> AttentionRouter -> 2 ExpertShards; faults."""

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from cluster.serve.args import ServeArgs
from cluster.serve.local_ray import APP_NAME
from cluster.serve.resolved import num_shards, resolve, resolve_planned
from cluster.serve.standalone import build_standalone_app
from tests.asgi_client import on_standalone
from tests.http import sse_line_chunks
from tests.waiting import wait_until, wait_until_async

CHAT = {"messages": [{"role": "user", "content": "Bonjour, qui es-tu ?"}], "temperature": 0, "max_tokens": 24}


def _args(tiny_dir) -> ServeArgs:
    return ServeArgs(model=str(tiny_dir), shards=2, dtype="fp32", kv_cache_bytes=2**24, shard_cpus=0.5,
                     recovery_timeout_s=120)


@pytest.fixture(scope="module")
def served(local_ray, tiny_dir):
    """The app from `build_app`, as `moe-cluster serve` runs it, on a free port."""
    from ray import serve

    from cluster.serve.app import build_app
    from cluster.parallel.channel import free_port

    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_args(tiny_dir)), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}", serve.get_deployment_handle("AttentionRouter", APP_NAME)
    serve.delete(APP_NAME)
    serve.shutdown()


def _standalone_text(tiny_dir, body: dict) -> str:
    """The same request on the single-process app (`--no-ray`), no Ray involved."""
    async def ask(client: httpx.AsyncClient) -> dict:
        return (await client.post("/v1/chat/completions", json=body)).json()

    return on_standalone(_args(tiny_dir), ask)["choices"][0]["message"]["content"]


def test_http_chat_completion_and_stream_match_single_process(served, tiny_dir):
    url, _ = served
    expected = _standalone_text(tiny_dir, CHAT)
    with httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == expected
        assert body["usage"]["completion_tokens"] > 0
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            chunks = sse_line_chunks(s.iter_lines())
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == expected
        assert client.get("/v1/models").json()["data"][0]["id"] == tiny_dir.name
        assert client.get("/health").status_code == 200
        r = client.post("/v1/chat/completions", json={**CHAT, "temperature": 7})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_forced_tool_call_and_a_json_schema_reply_through_the_serve_app(served):
    """The grammar guide inside the AttentionRouter's engine: a required tool call whose arguments validate against
    its schema, and a json_schema reply that does, with the openai SDK (the random model cannot do either alone)."""
    import json

    import openai

    from tests.test_openai_sdk import ASK, SCHEMAS, TOOLS, check_schema

    url, _ = served
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as client:
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=64, seed=11, temperature=1.0)
        assert r.choices[0].finish_reason == "tool_calls", r
        calls = r.choices[0].message.tool_calls
        assert calls and all(c.function.name in SCHEMAS for c in calls), calls
        for call in calls:
            check_schema(json.loads(call.function.arguments), SCHEMAS[call.function.name], call.function.name)
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
        fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": True}}
        r = client.chat.completions.create(model=model, messages=ASK, response_format=fmt, max_tokens=64, seed=2,
                                           temperature=1.0)
        check_schema(json.loads(r.choices[0].message.content), schema, "json_schema reply")


def test_killed_shard_gives_503s_then_the_unit_recovers(served):
    url, router = served
    info = router.shard_info.remote().result()
    victim = info[1]["pid"]
    long = {**CHAT, "max_tokens": 400, "temperature": 0.7, "seed": 1}

    async def load_then_kill() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=long)) for _ in range(8)]

            async def decoding() -> bool:
                stats = (await asyncio.to_thread(lambda: router.health.remote().result())).stats
                return stats["running"] > 0 and stats["waiting"] == 0

            await wait_until_async(decoding, 60, "the requests decoding")
            os.kill(victim, signal.SIGKILL)
            return await asyncio.gather(*tasks)

    t0 = time.monotonic()
    responses = asyncio.run(load_then_kill())
    assert time.monotonic() - t0 < 60  # failed, not hung
    statuses = [r.status_code for r in responses]
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses
    failed = next(r for r in responses if r.status_code == 503)
    assert "retry-after" in failed.headers and failed.json()["error"]["message"]

    with httpx.Client(base_url=url, timeout=60) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").text
            time.sleep(0.5)
        assert router.shard_info.remote().result()[1]["pid"] != victim
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        assert router.health.remote().result().stats["recoveries"] == 1


def test_a_killed_router_replica_gives_quick_503s_until_serve_brings_it_back(served):
    """While Serve restarts the AttentionRouter replica, chat requests and /health answer 503 within a second
    (instead of waiting for the new replica); then the new replica serves. Runs after the shard test: it replaces
    the whole unit."""
    url, router = served
    victim = router.health.remote().result().stats["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: httpx.get(f"{url}/health", timeout=60).status_code == 503, 30, "/health to see it gone")
    refusals = []
    with httpx.Client(base_url=url, timeout=60) as client:
        deadline = time.monotonic() + 180
        while True:
            t0 = time.monotonic()
            r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
            took = time.monotonic() - t0
            assert r.status_code in (200, 503), r.text
            if r.status_code == 200:
                break
            refusals.append((took, r.headers.get("retry-after"), client.get("/health").status_code))
            assert time.monotonic() < deadline, "the unit did not come back"
            time.sleep(0.2)
    assert len(refusals) >= 2, "no request was refused while the replica restarted"
    assert max(took for took, _, _ in refusals) < 1.0, refusals
    assert all(retry for _, retry, _ in refusals), refusals
    # /health, asked just after each refusal, said 503 too; but for the last one, where the replica may have come
    # back in between (its probe is fresh, the chat path's is up to a probe period old).
    assert all(health == 503 for _, _, health in refusals[:-1]), refusals
    assert router.health.remote().result().stats["pid"] != victim


def test_the_serve_config_file_holds_valid_app_args():
    import yaml
    from pathlib import Path

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "cluster.serve.app:build_app"
    args = ServeArgs.model_validate(app["args"])
    assert args.shards == 8 and args.device == "cuda"


def test_byte_sizes_read_the_same_in_a_config_file_as_on_the_command_line():
    from typing import get_args

    from pydantic import ByteSize

    from cluster.cli import parse_size

    sized = {name: field.annotation for name, field in ServeArgs.model_fields.items() if name.endswith("_bytes")}
    assert sized.keys() == {"kv_cache_bytes", "max_body_bytes"}
    assert [name for name, kind in sized.items() if ByteSize not in (kind, *get_args(kind))] == []
    args = ServeArgs.model_validate({"kv_cache_bytes": "2GB", "max_body_bytes": "512KiB"})  # as a YAML file has it
    assert (args.kv_cache_bytes, args.max_body_bytes) == (2 * 10**9, 512 * 2**10) == (parse_size("2GB"),
                                                                                      parse_size("512KiB"))
    assert ServeArgs.model_validate({"kv_cache_bytes": 2**24}).kv_cache_bytes == 2**24
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        ServeArgs.model_validate({"kv_cache_bytes": "two gigabytes"})


def test_serve_args_refuse_what_cannot_run(tiny_dir):
    from cluster.config import ModelConfig

    with pytest.raises(ValueError, match="shards=0 is for a dense model"):
        num_shards(ServeArgs(model=str(tiny_dir), shards=0), ModelConfig.from_file(tiny_dir))
    with pytest.raises(ValueError, match="units is a fixed count"):
        ServeArgs(units=2, max_units=4)
    with pytest.raises(ValueError, match="min_units=3 is above max_units=2"):
        ServeArgs(min_units=3, max_units=2)
    with pytest.raises(ValueError, match="need max_units"):
        ServeArgs(min_units=1)
    with pytest.raises(ValueError, match="unknown_option"):
        ServeArgs.model_validate({"unknown_option": 1})
    with pytest.raises(ValueError, match="9 shards for 8 experts"):
        num_shards(ServeArgs(model=str(tiny_dir), shards=9), ModelConfig.from_file(tiny_dir))
    with pytest.raises(ValueError, match="channel=nccl for attention ranks on cpu"):
        resolve(_args(tiny_dir).model_copy(update={"attention_ranks": 2, "channel": "nccl", "device": "cpu"}))
    with pytest.raises(ValueError, match="attention_ranks=2 runs each rank as a Ray actor"):
        build_standalone_app(resolve(_args(tiny_dir).model_copy(update={"attention_ranks": 2})))


def test_resolve_decides_every_setting_once(tiny_dir, tiny_dense_dir):
    import torch

    from cluster.config import ModelConfig

    r = resolve(ServeArgs(model=str(tiny_dir), shards=3, device="cpu", dtype="bf16", max_num_seqs=7, cuda_graphs="auto",
                  served_model_name="mix"))
    assert r.model_dir == tiny_dir.resolve() and r.model_dir.is_absolute()
    assert r.config == ModelConfig.from_file(tiny_dir) and r.model_name == "mix"
    assert (r.device, r.dtype, r.tokenizer_version) == ("cpu", torch.bfloat16, "v3")
    assert r.shard_groups == ((0, 1, 2), (3, 4, 5), (6, 7)) and r.layout.num_shards == 3
    assert (r.engine.max_num_seqs, r.engine.cuda_graphs, r.sampling.temperature) == (7, False, 0.5)
    dense = resolve(ServeArgs(model=str(tiny_dense_dir), device="cpu"))
    assert (dense.num_shards, dense.sampling.temperature, dense.tokenizer_version) == (0, 0.3, "v1")
    on_gpus = resolve(ServeArgs(model=str(tiny_dir), device="cuda", dtype="auto"))  # decided without a GPU here
    assert (on_gpus.dtype, on_gpus.engine.cuda_graphs, on_gpus.layout.local_shards) == (torch.bfloat16, True, (0,))
    with pytest.raises(ValueError, match="cuda_graphs=on needs a CUDA device"):
        resolve(ServeArgs(model=str(tiny_dir), device="cpu", cuda_graphs="on"))


@pytest.mark.parametrize("gpus, bundles", [(None, [{"CPU": 0.5, "GPU": 1}, {"CPU": 0.25, "GPU": 1}]),
                                           (3, [{"CPU": 0.5, "GPU": 1}] + [{"CPU": 0.25, "GPU": 1}] * 2)],
                         ids=["shard-0-in-the-replica", "replica-on-its-own-gpu"])
def test_build_app_reserves_the_planned_unit_on_gpus(tiny_dir, gpus, bundles):
    """What Serve is asked for on GPUs (no Ray needed to build it): the layout's bundles, packed on one node."""
    from cluster.config import ModelConfig
    from cluster.parallel.placement import plan_placement
    from cluster.serve.app import build_app

    args = ServeArgs(model=str(tiny_dir), shards=2, device="cuda", dtype="fp32", gpus=gpus)
    router = build_app(args)._bound_deployment.init_args[0]._bound_deployment  # Ingress(router, ...) -> the router
    assert router.ray_actor_options["num_gpus"] == 1
    assert router._replica_config.placement_group_bundles == bundles  # Ray keeps the reservation here
    assert router._replica_config.placement_group_strategy == "STRICT_PACK"
    plan = plan_placement(ModelConfig.from_file(tiny_dir), gpus or 2, 2**34, num_shards=2, min_kv_tokens=0)
    assert len(bundles) == plan.layout.num_gpus


def test_build_app_needs_no_checkpoint_on_the_node_that_builds_it(tmp_path):
    """Mixtral 8x22B on 8 GPUs, autoscaled, built where /models does not exist (a KubeRay head): the reservation
    comes from the arguments; the replica, where the checkpoint is, reads config.json and finds the same unit."""
    from ray.serve.config import AutoscalingConfig

    from cluster.serve.app import build_app

    absent = tmp_path / "Mixtral-8x22B-Instruct-v0.1"
    args = {"model": str(absent), "shards": 8, "device": "cuda", "dtype": "bf16", "min_units": 1, "max_units": 3,
            "max_num_seqs": 96, "replica_cpus": 4, "shard_cpus": 2, "ingress_resource": "moe_ingress"}
    ingress = build_app(args)._bound_deployment
    router = ingress.init_args[0]._bound_deployment
    assert router._replica_config.placement_group_bundles == [{"CPU": 4, "GPU": 1}] + [{"CPU": 2, "GPU": 1}] * 7
    assert router._replica_config.placement_group_strategy == "STRICT_PACK"
    scaling = router._deployment_config.autoscaling_config
    assert isinstance(scaling, AutoscalingConfig)
    # target: one unit's batch (max_num_seqs)
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 96)
    assert ingress.num_replicas == 2 and ingress.ray_actor_options["resources"] == {"moe_ingress": 1}
    # A replica Serve stops lets its requests run for the shutdown grace.
    assert router._deployment_config.graceful_shutdown_timeout_s == ServeArgs().shutdown_grace_s

    # On the replica's node: the real config.json (weights are not needed to resolve).
    config_dir = Path(__file__).parent / "data" / "configs" / "mixtral-8x22b-instruct"
    on_replica = ServeArgs.model_validate({**args, "model": str(config_dir)})
    resolved = resolve_planned(on_replica)
    assert (resolved.num_shards, resolved.config.hidden_size, resolved.tokenizer_version) == (8, 6144, "v3")
    assert resolved.layout.num_gpus == 8


def test_moe_cluster_serve_reserves_no_shards_for_a_dense_checkpoint(tiny_dense_dir, tiny_dir):
    """With `shards` left at its default; one given explicitly stays, and its replica would refuse it."""
    from cluster.serve.local_ray import _fit_to_checkpoint

    def fit(args: ServeArgs) -> int:
        return _fit_to_checkpoint(args, resolve(args)).shards

    assert fit(ServeArgs(model=str(tiny_dense_dir), device="cpu")) == 0
    assert fit(ServeArgs(model=str(tiny_dense_dir), device="cpu", shards=2)) == 2
    assert fit(ServeArgs(model=str(tiny_dir), device="cpu")) == ServeArgs().shards


def test_a_unit_reserved_for_the_wrong_model_is_refused_on_its_replica(tiny_dense_dir, tiny_dir):
    with pytest.raises(ValueError, match="needs 0 expert shards, but the unit reserved 2: set shards to 0"):
        resolve_planned(ServeArgs(model=str(tiny_dense_dir), shards=2, device="cpu"))
    assert resolve_planned(ServeArgs(model=str(tiny_dense_dir), shards=0, device="cpu")).num_shards == 0
    assert resolve_planned(ServeArgs(model=str(tiny_dir), shards=2, device="cpu")).num_shards == 2


@pytest.mark.e2e  # the HTTP app over a real engine
def test_health_names_the_kernels_in_use(tiny_dir):
    args = ServeArgs(model=str(tiny_dir), device="cpu", dtype="fp32", kv_cache_bytes=2**24, moe_backend="torch",
                     attention_backend="torch")
    app, engine = build_standalone_app(resolve(args))

    async def health() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/health")

    try:
        r = asyncio.run(health())
    finally:
        engine.shutdown()
    assert r.status_code == 200, r.text
    assert (r.json()["stats"]["moe_kernel"], r.json()["stats"]["attention_kernel"]) == ("torch", "torch")


KEYED_APP = "keyed"  # a second Serve application beside `served`'s, with a ledger


def _in_ledger(url: str, work):
    """`await work(ledger)` on a fresh handle to the ledger at `url`, closed after (each call its own event loop)."""
    from cluster.ledger import open_ledger

    async def run():
        ledger = open_ledger(url)
        try:
            return await work(ledger)
        finally:
            await ledger.close()

    return asyncio.run(run())


DP_APP = "data-parallel"


def test_a_data_parallel_unit_serves_the_single_process_text_over_http(served, tiny_dir):
    """attention_ranks=2 through Serve, the Ingress in front, as `moe-cluster serve --attention-ranks 2` runs it:
    the replica starts its two ranks (in its unit's placement group) and serves the single process's text."""
    from ray import serve

    from cluster.serve.app import build_app

    serve.run(build_app(_args(tiny_dir).model_copy(update={"attention_ranks": 2})), name=DP_APP, route_prefix="/dp")
    try:
        expected = _standalone_text(tiny_dir, CHAT)
        with httpx.Client(base_url=f"{served[0]}/dp", timeout=120) as client:
            texts = []
            for _ in range(4):
                r = client.post("/v1/chat/completions", json=CHAT)
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["message"]["content"])
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
                chunks = sse_line_chunks(s.iter_lines())
            texts.append("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]))
            assert texts == [expected] * 5
            health = client.get("/health")
            assert health.status_code == 200, health.text
        stats = serve.get_deployment_handle("AttentionRouter", DP_APP).health.remote().result().stats
        assert stats["attention_ranks"] == 2 and stats["recoveries"] == 0 and len(stats["ranks"]) == 2
        info = serve.get_deployment_handle("AttentionRouter", DP_APP).shard_info.remote().result()
        assert [i["rank"] for i in info] == [0, 1] and all(i["connected"] for i in info)
    finally:
        serve.delete(DP_APP)


@pytest.fixture(scope="module")
def keyed(served, tiny_dir, tmp_path_factory):
    """`build_app` with `db` set (a SQLite file this module owns), under /keyed on `served`'s Serve; a key with $1."""
    from ray import serve

    from cluster.serve.app import build_app

    url = f"sqlite:///{tmp_path_factory.mktemp('ledger')}/ledger.db"
    record, key = _in_ledger(url, lambda ledger: ledger.create_key("serve-test", 1_000_000))
    serve.run(build_app(_args(tiny_dir).model_copy(update={"db": url})), name=KEYED_APP, route_prefix="/keyed")
    yield f"{served[0]}/keyed", url, record, key
    serve.delete(KEYED_APP)


def test_keys_and_credits_through_the_serve_app(keyed):
    """The Ingress replica opens the ledger itself: /v1 wants a key, a keyed request is stamped with the balance,
    a streamed one settles into the usage log and leaves no reservation open; /health stays open."""

    from cluster.ledger import format_dollars, parse_dollars

    base, url, record, key = keyed
    body = {**CHAT, "max_tokens": 4}
    with httpx.Client(base_url=base, timeout=120) as client:
        # Under a route prefix Serve keeps it in scope["path"] (and sets root_path): auth must see the route path.
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert client.get("/health").status_code == 200

        auth = {"Authorization": f"Bearer {key}"}
        r = client.post("/v1/chat/completions", json=body, headers=auth)
        assert r.status_code == 200, r.text
        first_cost = 1_000_000 - parse_dollars(r.headers["x-remaining-credits"])
        assert first_cost > 0, r.headers

        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=stream, headers=auth) as s:
            assert s.status_code == 200 and "x-remaining-credits" in s.headers, s.headers
            last = sse_line_chunks(s.iter_lines())[-1]
        request_id, usage = last["id"], last["usage"]
        assert usage["completion_tokens"] > 0, last

    deadline = time.monotonic() + 30
    while _in_ledger(url, lambda ledger: ledger.open_reservations(record.key_id)) != 0:
        assert time.monotonic() < deadline, "a reservation stayed open"
        time.sleep(0.2)
    rows = {u.request_id: u for u in _in_ledger(url, lambda ledger: ledger.usage(record.key_id))}
    assert len(rows) == 2, rows
    settled = rows[request_id]
    assert (settled.prompt_tokens, settled.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    balance = _in_ledger(url, lambda ledger: ledger.authenticate(key)).balance_micro
    assert balance == 1_000_000 - sum(u.cost_micro for u in rows.values()) and balance < 1_000_000 - first_cost
    assert usage["remaining_credits"] == format_dollars(balance), last
