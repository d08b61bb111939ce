"""Admission control: the n x KV-need check, the cap on `n`, and the bounded waiting room (429 past it)."""

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from cluster.api.server import build_api
from cluster.config import ModelConfig
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.outputs import OverloadedError, RequestError
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.engine.sampling_params import SamplingDefaults, SamplingParams
from cluster.model.loader import load_model
from cluster.serve.args import ServeArgs
from cluster.serve.engine_backend import EngineBackend
from cluster.serve.resolved import resolve
from cluster.serve.standalone import build_standalone_app
from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version
from tests.asgi_client import asgi_post

SHORT = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def _engine(model, tok, blocks: int, **config) -> LLMEngine:
    block_bytes = kv_bytes_per_block(model.config, 16, torch.float32)
    return LLMEngine(model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=blocks * block_bytes, **config))


def _drain(engine: LLMEngine) -> dict[int, str]:
    """Step until idle; each choice's finish reason."""
    finished = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finished[out.index] = out.finish_reason
    return finished


def _all_free(engine: LLMEngine) -> bool:
    return engine.blocks.num_free == engine.blocks.num_blocks and not engine.requests


# -- the KV need of all n choices ------------------------------------------------------------------------------------
def test_the_kv_need_counts_every_choice(model, tok):
    engine = _engine(model, tok, blocks=10)
    prompt = [5] * 50  # 50 + 14 max_tokens = 64 tokens: 4 blocks of 16 per choice
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, n=3)
    with pytest.raises(RequestError, match=r"needs 12 KV-cache blocks \(n=3 x 4 blocks of 16 tokens for 50 prompt "
                                           r"\+ 14 max_tokens\) but the cache holds only 10"):
        engine.add_request("three", prompt, params)  # one choice (4 blocks) fits; three (12) never can
    assert _all_free(engine)
    engine.add_request("two", prompt, SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, n=2))  # 8 of 10
    assert _drain(engine) == {0: "length", 1: "length"}
    assert _all_free(engine)


def test_the_kv_need_boundary_is_exact(model, tok):
    engine = _engine(model, tok, blocks=8)
    fits = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, n=2)  # 2 x (48 + 16 = 64 tokens) = 8 blocks
    engine.validate([7] * 48, fits)
    with pytest.raises(RequestError, match="needs 10 KV-cache blocks .* holds only 8"):
        engine.validate([7] * 49, fits)  # one token more: 5 blocks per choice


# -- the cap on n ----------------------------------------------------------------------------------------------------
def test_n_is_capped_by_the_config(model, tok):
    engine = _engine(model, tok, blocks=64, max_n=4)
    engine.validate([1, 2, 3], SamplingParams(max_tokens=2, n=4))
    with pytest.raises(RequestError, match="n is 5; this server allows at most 4 choices per request"):
        engine.validate([1, 2, 3], SamplingParams(max_tokens=2, n=5))
    assert EngineConfig().max_n == 16


def test_serve_args_reach_the_engine_config(tiny_dir):
    resolved = resolve(ServeArgs(model=str(tiny_dir), device="cpu", max_waiting=7, max_n=3, max_num_seqs=5))
    assert (resolved.engine.max_waiting, resolved.engine.max_n, resolved.engine.max_num_seqs) == (7, 3, 5)
    assert ServeArgs().shutdown_grace_s == 30.0
    with pytest.raises(ValueError, match="max_n"):
        ServeArgs(max_n=0)
    with pytest.raises(ValueError, match="max_waiting"):
        ServeArgs(max_waiting=-1)


# -- the waiting room ------------------------------------------------------------------------------------------------
class _Held:
    """Keeps the engine thread busy in a `call` until released, so admission is decided while nothing finishes."""

    def __init__(self, front: AsyncEngine):
        self.release = threading.Event()
        self.done = front.call(lambda engine: self.release.wait(30))

    def __enter__(self) -> "_Held":
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.done.result(timeout=30)


async def _collect(deltas) -> list[str | None]:
    return [out.finish_reason async for out in deltas if out.finished]


def test_admission_counts_sequences_and_refuses_past_the_bound(model, tok):
    front = AsyncEngine(lambda: _engine(model, tok, blocks=64, max_num_seqs=2, max_waiting=3))  # 5 sequences
    try:
        async def scenario():
            with _Held(front):
                admitted = [await front.add_request("n3", [1, 2, 3], SamplingParams(
                    max_tokens=3, temperature=0, ignore_eos=True, n=3))]
                admitted.append(await front.add_request("a", [4, 5], SHORT))
                assert front.in_flight == 4
                assert front.overloaded() is None
                admitted.append(await front.add_request("b", [6, 7], SHORT))  # 4 < 5: admitted, now 5
                assert "5 sequences are in flight" in EngineBackend(front).overloaded()
                with pytest.raises(OverloadedError, match=r"5 sequences are in flight \(2 run at once and at most 3 "
                                                          r"may wait\)"):
                    await front.add_request("c", [8, 9], SHORT)
                assert OverloadedError("").status == 429
                front.max_waiting = 4  # changed while it runs (the AttentionRouter's user_config): one more may wait
                assert front.overloaded() is None
                front.max_waiting = 3
                refused = [out async for out in EngineBackend(front).generate("d", [8, 9], SHORT)]
                assert [(o.finish_reason, o.error_status) for o in refused] == [("error", 429)], refused
            results = await asyncio.gather(*map(_collect, admitted))
            assert results == [["length"] * 3, ["length"], ["length"]]
            assert front.in_flight == 0
            assert [o.finish_reason async for o in await front.add_request("e", [8, 9], SHORT)][-1] == "length"

        asyncio.run(scenario())
        assert front.call(_all_free).result(timeout=10)
    finally:
        front.shutdown()


def test_a_consumer_that_leaves_early_frees_its_place(model, tok):
    front = AsyncEngine(lambda: _engine(model, tok, blocks=64, max_num_seqs=1, max_waiting=0))  # one sequence
    try:
        async def scenario():
            params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
            outputs = EngineBackend(front).generate("long", [1, 2, 3], params)
            first = await anext(outputs)
            assert first.error is None and front.in_flight == 1
            refused = [out async for out in EngineBackend(front).generate("next", [1, 2], SHORT)]
            assert refused[0].error_status == 429, refused
            await outputs.aclose()  # a client that disconnects
            assert front.in_flight == 0
            finals = [out async for out in EngineBackend(front).generate("after", [1, 2], SHORT) if out.finished]
            assert [(o.finish_reason, o.error) for o in finals] == [("length", None)]

        asyncio.run(scenario())
        deadline = time.monotonic() + 5
        while not front.call(_all_free).result(timeout=10) and time.monotonic() < deadline:
            time.sleep(0.01)  # the abort reaches the engine thread between steps
        assert front.call(_all_free).result(timeout=10)
    finally:
        front.shutdown()


# 7 prompt tokens (the chat template around "Say hello.") + 100 = 107 tokens: 7 blocks per choice
KV_NEED = ("needs 28 KV-cache blocks (n=4 x 7 blocks of 16 tokens for 7 prompt + 100 max_tokens) but the cache holds "
           "only 16")


def test_the_api_answers_each_refusal_with_its_status(tiny_dir):
    loaded = load_model(tiny_dir, "fp32")
    api_tok = load_tokenizer(resolve_tokenizer_version(loaded.config))
    front = AsyncEngine(lambda: LLMEngine(loaded.model, api_tok.decode, api_tok.eos_id, EngineConfig(
        kv_cache_bytes=16 * kv_bytes_per_block(loaded.config, 16, torch.float32), max_num_seqs=1, max_waiting=0,
        max_n=4)))
    app = build_api(EngineBackend(front), api_tok, "m", loaded.config.max_position_embeddings,
                    SamplingDefaults(temperature=0))
    hello = [{"role": "user", "content": "Say hello."}]

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            def post(**body):
                return client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2, **body})

            too_many, too_big = await post(n=5), await post(n=4, max_tokens=100)
            with _Held(front):
                admitted = asyncio.create_task(post())
                while front.in_flight == 0:  # the admitted request reaches the engine's front
                    await asyncio.sleep(0.001)
                full, full_streamed = await post(), await post(stream=True)
            return too_many, too_big, full, full_streamed, await admitted

    try:
        too_many, too_big, full, full_streamed, admitted = asyncio.run(scenario())
        for response, status, kind, needle in [
                (too_many, 400, "invalid_request_error", "n is 5; this server allows at most 4 choices"),
                (too_big, 400, "invalid_request_error", KV_NEED),
                (full, 429, "rate_limit_error", "1 sequences are in flight (1 run at once and at most 0 may wait)"),
                (full_streamed, 429, "rate_limit_error", "sequences are in flight")]:
            error = response.json()["error"]
            assert (response.status_code, error["type"]) == (status, kind) and needle in error["message"], error
        assert admitted.status_code == 200 and admitted.json()["choices"][0]["finish_reason"] == "length"
        assert front.call(_all_free).result(timeout=10) and front.in_flight == 0
    finally:
        front.shutdown()


# -- 1000 concurrent requests on the single-process server -----------------------------------------------------------
CONCURRENT, MAX_NUM_SEQS, MAX_WAITING = 1000, 32, 128
CAPACITY = MAX_NUM_SEQS + MAX_WAITING


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the request reaching the app to its last byte


async def _asgi_post(app, path: str, body: dict) -> _Answer:
    """One POST straight into the ASGI app, timed from its arrival there: what a client elsewhere would wait, without
    an in-process HTTP client's own work (which, for 1000 clients in this event loop, would double the figure)."""
    chunks: list[bytes] = []
    start: dict = {}

    def on_message(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    began = time.monotonic()
    await asgi_post(app, path, body, on_message)
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return _Answer(start["status"], headers, b"".join(chunks), time.monotonic() - began)


@pytest.mark.e2e
def test_a_thousand_concurrent_requests_get_200_or_a_quick_429(tiny_dir: Path):
    """The engine is held busy while the 1000 arrive (an overloaded server's engine finishes nothing soon), so the
    split is exact: CAPACITY admitted, the rest refused without waiting on the engine; then the admitted complete."""
    config = ModelConfig.from_file(tiny_dir)
    args = ServeArgs(model=str(tiny_dir), device="cpu", dtype="fp32", moe_backend="torch", attention_backend="torch",
                     kv_cache_bytes=512 * kv_bytes_per_block(config, 16, torch.float32), max_num_seqs=MAX_NUM_SEQS,
                     max_waiting=MAX_WAITING)
    resolved = resolve(args)
    app, front = build_standalone_app(resolved)
    engine = front.engine
    most = {"in_engine": 0}
    step = engine.step

    def watched_step():  # on the engine thread: how full the engine's own queues ever got
        most["in_engine"] = max(most["in_engine"], len(engine.scheduler.running) + len(engine.scheduler.waiting))
        return step()

    engine.step = watched_step
    body = {"model": resolved.model_name, "messages": [{"role": "user", "content": "Count to three."}],
            "max_tokens": 2, "temperature": 0}

    async def burst() -> tuple[list[_Answer], list[_Answer]]:
        with _Held(front):
            posts = [asyncio.create_task(_asgi_post(app, "/v1/chat/completions", body)) for _ in range(CONCURRENT)]
            deadline = time.monotonic() + 60
            while sum(p.done() for p in posts) < CONCURRENT - CAPACITY and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            while_held = [p.result() for p in posts if p.done()]
        return while_held, await asyncio.gather(*posts)

    try:
        while_held, answers = asyncio.run(burst())
        assert len(while_held) == CONCURRENT - CAPACITY, f"{len(while_held)} answered while the engine was busy"
        assert all(a.status == 429 for a in while_held), sorted({a.status for a in while_held})
        # Refused without waiting on the engine (held until every refusal is in): the last of the 840 waits only for
        # the event loop to refuse the ones before it, not for a step.
        slowest = max(a.seconds for a in while_held)
        assert slowest < 3.0, f"a 429 took {slowest:.2f} s"
        error = json.loads(while_held[0].body)["error"]
        assert error["type"] == "rate_limit_error", error
        assert f"{CAPACITY} sequences are in flight ({MAX_NUM_SEQS} run at once and at most {MAX_WAITING} may " \
               f"wait)" in error["message"], error
        assert all(int(a.headers.get("retry-after", "0")) > 0 for a in while_held), while_held[0].headers
        admitted = [a for a in answers if a.status != 429]
        assert len(admitted) == CAPACITY and all(a.status == 200 for a in admitted), {a.status for a in admitted}
        assert all(json.loads(a.body)["choices"][0]["finish_reason"] == "length" for a in admitted)
        assert most["in_engine"] == CAPACITY, most
        stats = front.call(lambda e: e.stats()).result(timeout=10)
        assert stats.free_blocks == stats.total_blocks and stats.running == stats.waiting == 0, stats
        assert front.in_flight == 0
    finally:
        front.shutdown()
