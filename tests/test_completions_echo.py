"""/v1/completions as evaluation harnesses use it (issue 24), over HTTP on a real engine (tiny checkpoint, fp32): a
list of prompts (strings or token ids) as choices prompt_index * n + i, admitted and refused together, one
reservation for all; `echo` with prompt logprobs and `max_tokens: 0`, read exactly as lm-eval's local-completions
reads them and checked against one full forward of the model; one logprob entry per generated token."""

import asyncio
import json
from typing import Any

import httpx
import pytest
import torch

from cluster.api.accounts import Accounts
from cluster.api.server import build_api
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.engine.sampling_params import SamplingDefaults
from cluster.ledger import Pricing, open_ledger
from cluster.model.kv_cache import ContiguousKVCache
from cluster.model.loader import load_model
from cluster.serve.engine_backend import EngineBackend
from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version
from tests.http import sse_chunks

pytestmark = pytest.mark.e2e  # the whole HTTP stack through a real engine

MODEL = "mixtral-tiny"
ATOL = 1e-5


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(tiny_dir, "fp32")


@pytest.fixture(scope="module")
def tok(loaded):
    return load_tokenizer(resolve_tokenizer_version(loaded.config))


def _front(loaded, tok, **config: Any) -> AsyncEngine:
    blocks = 512 * kv_bytes_per_block(loaded.config, 16, torch.float32)
    return AsyncEngine(lambda: LLMEngine(loaded.model, tok.decode, tok.eos_id,
                                         EngineConfig(kv_cache_bytes=blocks, **config)))


def _app(loaded, tok, front: AsyncEngine, accounts: Accounts | None = None):
    return build_api(EngineBackend(front), tok, MODEL, loaded.config.max_position_embeddings,
                     SamplingDefaults.for_model(loaded.config), accounts=accounts)


@pytest.fixture(scope="module")
def served(loaded, tok):
    front = _front(loaded, tok)
    yield _app(loaded, tok, front), front
    front.shutdown()


def _post(app, body: dict, headers: dict | None = None) -> httpx.Response:
    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=60) as client:
            return await client.post("/v1/completions", json=body, headers=headers)

    return asyncio.run(scenario())


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return sse_chunks(response.text)


def _reference(loaded, ids: list[int]) -> torch.Tensor:
    """[L, V] log-softmax of one fp32 full forward of the model over `ids`."""
    model, c = loaded.model, loaded.config
    cache = ContiguousKVCache(c.num_layers, 1, len(ids), c.num_kv_heads, c.head_dim)
    positions = cache.begin_step([0], [len(ids)])
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), positions, cache)).log_softmax(dim=-1)


def _random_ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 32768, (n,), generator=gen).tolist()


# -- lm-eval -------------------------------------------------------------------------------------------------------
def _lm_eval_loglikelihoods(response: dict, ctxlens: list[int], generated: bool) -> list[tuple[float, bool]]:
    """What lm-eval's local-completions does with a loglikelihood response (`parse_logprobs`): the choices in index
    order, one per request; the entries after the context are the continuation's (the last one left out when it
    asked for a generated token); their sum, and whether each is its position's best alternative."""
    results = []
    for choice, ctxlen in zip(sorted(response["choices"], key=lambda c: c["index"]), ctxlens):
        end = -1 if generated else None
        logprobs = choice["logprobs"]["token_logprobs"][ctxlen:end]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:end]
        results.append((sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops))))
    return results


@pytest.mark.parametrize("max_tokens", [1, 0])  # lm-eval since 0.4.3 asks for one token; before, for none
def test_lm_eval_loglikelihoods_equal_the_reference_forward(served, loaded, tok, max_tokens):
    app, _ = served
    context = tok.encode("Question: what is two plus two? Answer:", bos=True)
    ref = _reference(loaded, context)
    best = int(ref[-1].argmax())  # the model's own continuation: greedy
    greedy = [best, int(_reference(loaded, context + [best])[-1].argmax())]
    requests = [(context, tok.encode(" four")), (context, greedy), (_random_ids(30, seed=1), _random_ids(3, seed=2))]
    body = {"model": MODEL, "prompt": [c + cont for c, cont in requests], "echo": True, "max_tokens": max_tokens,
            "logprobs": 1, "temperature": 0.0, "seed": 1234}
    response = _ok(_post(app, body))
    got = _lm_eval_loglikelihoods(response, [len(c) for c, _ in requests], generated=max_tokens > 0)
    for (ll, is_greedy), (ctx, cont) in zip(got, requests):
        scores = _reference(loaded, ctx + cont)[len(ctx) - 1:-1]  # the rows predicting the continuation
        want = scores[torch.arange(len(cont)), torch.tensor(cont)]
        assert ll == pytest.approx(float(want.sum()), abs=ATOL * len(cont))
        assert is_greedy == (scores.argmax(dim=-1).tolist() == cont)
    assert [g for _, g in got] == [False, True, False]
    assert all(c["finish_reason"] == "length" for c in response["choices"])
    assert response["usage"]["completion_tokens"] == 3 * max_tokens


# -- echo ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["Hello world, and  welcome", "prompt as token ids"])
def test_echo_puts_the_scored_prompt_before_the_completion(served, loaded, tok, prompt):
    app, _ = served
    ids = tok.encode(prompt, bos=True)
    sent = prompt if prompt.startswith("Hello") else ids
    body = {"prompt": sent, "max_tokens": 4, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    plain = _ok(_post(app, body))["choices"][0]
    echoed = _ok(_post(app, body | {"echo": True}))["choices"][0]
    text = sent if isinstance(sent, str) else tok.decode(ids)  # the prompt as sent, or its ids' text
    assert echoed["text"] == text + plain["text"]
    lps, plain_lps = echoed["logprobs"], plain["logprobs"]
    n = len(ids)
    assert len(lps["tokens"]) == n + 4
    # The prompt's entries: BOS is "", the first has no logprob; the tokens spell the text, offsets count it.
    assert lps["tokens"][0] == "" and lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert "".join(lps["tokens"]) == echoed["text"]
    assert lps["text_offset"] == [len("".join(lps["tokens"][:i])) for i in range(n + 4)]
    ref = _reference(loaded, ids)
    want = ref[torch.arange(n - 1), torch.tensor(ids[1:])].tolist()
    assert lps["token_logprobs"][1:n] == pytest.approx(want, abs=ATOL)
    for token, lp, top in zip(lps["tokens"][1:n], lps["token_logprobs"][1:n], lps["top_logprobs"][1:n]):
        assert top[token] == lp and len(top) <= 3
    # The completion's entries are the plain request's, their offsets after the prompt.
    for name in ("tokens", "token_logprobs", "top_logprobs"):
        assert lps[name][n:] == plain_lps[name]
    assert lps["text_offset"][n:] == [len(text) + o for o in plain_lps["text_offset"]]


def test_max_tokens_0_with_echo_scores_the_prompt_alone(served, loaded, tok):
    app, _ = served
    body = {"prompt": "Once upon a time", "max_tokens": 0, "echo": True, "logprobs": 0}
    response = _ok(_post(app, body))
    choice = response["choices"][0]
    ids = tok.encode("Once upon a time", bos=True)
    assert (choice["text"], choice["finish_reason"]) == ("Once upon a time", "length")
    assert response["usage"]["completion_tokens"] == 0 and response["usage"]["prompt_tokens"] == len(ids)
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    assert all(top is None or len(top) == 1 for top in choice["logprobs"]["top_logprobs"])  # the token itself
    unscored = _ok(_post(app, {"prompt": "Once upon a time", "max_tokens": 0, "echo": True}))["choices"][0]
    assert unscored["text"] == "Once upon a time" and unscored["logprobs"] is None
    events = _events(_post(app, body | {"stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == "Once upon a time"
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_each_generated_token_has_an_entry_control_tokens_as_empty_text(served, tok):
    app, _ = served
    inst = tok.control_token("[INST]")  # the sampler is pushed onto a control token every step
    body = {"prompt": "Hello", "max_tokens": 5, "logprobs": 1, "temperature": 0, "logit_bias": {str(inst): 100}}
    for response in (_ok(_post(app, body)), _ok(_post(app, body | {"echo": True}))):
        choice = response["choices"][0]
        assert response["usage"]["completion_tokens"] == 5
        completion = choice["logprobs"]["tokens"][-5:]
        assert completion == [""] * 5 and "".join(choice["logprobs"]["tokens"]) == choice["text"]
        assert all(top[""] == lp for top, lp in zip(choice["logprobs"]["top_logprobs"][-5:],
                                                     choice["logprobs"]["token_logprobs"][-5:]))
    events = _events(_post(app, body | {"stream": True}))
    assert sum(len((e["choices"][0]["logprobs"] or {}).get("tokens", [])) for e in events if e["choices"]) == 5


def test_the_token_that_ends_a_completion_has_its_entry_too(served, tok):
    app, _ = served
    body = {"prompt": "Hello", "max_tokens": 5, "logprobs": 1, "temperature": 0, "logit_bias": {str(tok.eos_id): 100}}
    for response in (_ok(_post(app, body)), _ok(_post(app, body | {"echo": True}))):
        choice = response["choices"][0]
        assert (response["usage"]["completion_tokens"], choice["finish_reason"]) == (1, "stop")
        assert choice["logprobs"]["tokens"][-1] == "" and choice["logprobs"]["top_logprobs"][-1] is not None
    events = _events(_post(app, body | {"stream": True}))
    assert sum(len((e["choices"][0]["logprobs"] or {}).get("tokens", [])) for e in events if e["choices"]) == 1


# -- several prompts -----------------------------------------------------------------------------------------------
def test_several_prompts_are_choices_in_prompt_order_streamed_or_not(served, tok):
    app, _ = served
    prompts = ["Hello world", "The cat", "Once upon a time"]
    body = {"prompt": prompts, "n": 2, "max_tokens": 5, "temperature": 0.8, "seed": 11, "logprobs": 1, "echo": True,
            "stream_options": None}
    whole = _ok(_post(app, body))
    singles = [_ok(_post(app, body | {"prompt": p})) for p in prompts]
    assert [c["index"] for c in whole["choices"]] == list(range(6))
    for p, single in enumerate(singles):
        for i in range(2):
            _assert_same_choice(whole["choices"][p * 2 + i], single["choices"][i])
    prompt_tokens = [len(tok.encode(p, bos=True)) for p in prompts]
    assert whole["usage"]["prompt_tokens"] == sum(prompt_tokens)  # each prompt once, not n times
    assert whole["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)

    events = _events(_post(app, body | {"stream": True, "stream_options": {"include_usage": True}}))
    texts = [""] * 6
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert events[-1]["usage"]["prompt_tokens"] == sum(prompt_tokens) and events[-1]["choices"] == []


def _assert_same_choice(choice: dict, alone: dict) -> None:
    """The same tokens and text; logprobs as equal as fp32 allows in another batch."""
    assert {k: choice[k] for k in ("text", "finish_reason")} == {k: alone[k] for k in ("text", "finish_reason")}
    got, want = choice["logprobs"], alone["logprobs"]
    assert (got["tokens"], got["text_offset"]) == (want["tokens"], want["text_offset"])
    assert got["token_logprobs"][0] is want["token_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:], abs=ATOL)
    for top, alone_top in zip(got["top_logprobs"][1:], want["top_logprobs"][1:]):
        assert top == pytest.approx(alone_top, abs=ATOL)


def test_usage_counts_each_prompt_and_its_cached_tokens_once(served):
    app, _ = served
    prompts = [_random_ids(40, seed=3), _random_ids(40, seed=4)]
    body = {"prompt": prompts, "n": 3, "max_tokens": 2, "temperature": 0, "cache_salt": "usage-test"}
    first, again = _ok(_post(app, body)), _ok(_post(app, body))
    assert first["usage"]["prompt_tokens"] == again["usage"]["prompt_tokens"] == 80
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 64  # 2 full blocks of each prompt, once


async def _engine_idle(front: AsyncEngine) -> bool:
    """Nothing left in the engine (after the aborts already sent: the engine thread takes commands in order)."""
    busy = await asyncio.wrap_future(front.call(lambda e: e.has_work() or bool(e.requests)))
    return not busy and front.in_flight == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_refused_refuses_the_whole_request_and_stops_the_others(loaded, tok, stream):
    """Room for two sequences in flight: of three prompts, the third is refused (429), so the request is, and the
    two admitted ones stop at once."""
    front = _front(loaded, tok, max_num_seqs=1, max_waiting=1)
    try:
        app = _app(loaded, tok, front)
        body = {"prompt": ["one", "two", "three"], "max_tokens": 500, "ignore_eos": True, "stream": stream}
        response = _post(app, body)
        assert response.status_code == 429, response.text
        assert response.json()["error"]["type"] == "rate_limit_error" and "capacity" in response.json()["error"][
            "message"]
        assert asyncio.run(_engine_idle(front))
        assert _ok(_post(app, body | {"prompt": ["one", "two"], "max_tokens": 2, "stream": False}))  # room again
    finally:
        front.shutdown()


def test_a_client_that_leaves_stops_every_prompt(served):
    """The client goes after the first chunk of a stream of three long prompts' choices."""
    app, front = served
    body = {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    raw = json.dumps(body).encode()

    async def scenario() -> tuple[list[dict], bool]:
        leave = asyncio.Event()
        request = [{"type": "http.request", "body": raw, "more_body": False}]

        async def receive() -> dict:
            if request:
                return request.pop()
            await leave.wait()
            return {"type": "http.disconnect"}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                leave.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("test", 1),
                 "server": ("test", 80)}
        await asyncio.wait_for(app(scope, receive, send), timeout=60)
        return sent, await _engine_idle(front)

    sent, idle = asyncio.run(scenario())
    assert idle, "the engine still runs prompts of the abandoned request"
    body_text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert body_text.startswith(b"data: ") and b"[DONE]" not in body_text


def test_one_reservation_covers_every_prompt(loaded, tok, served, tmp_path):
    """Credits for the worst case of all prompts at once (prompt tokens + prompts x n x max_tokens): a key with a
    micro-dollar less is refused the whole request, one with exactly that pays exactly that."""
    _, front = served
    pricing = Pricing(1_000_000, 3_000_000)  # 1 and 3 micro-dollars a token
    url = f"sqlite:///{tmp_path}/ledger.db"
    prompts = [[1, 100, 200, 300], [1, 5, 6]]
    worst = pricing.cost(7, 2 * 2 * 4)
    body = {"prompt": prompts, "n": 2, "max_tokens": 4, "ignore_eos": True, "temperature": 0}

    async def scenario() -> tuple[httpx.Response, httpx.Response, list[int], int]:
        accounts = Accounts.open(url, pricing)
        app = _app(loaded, tok, front, accounts)
        ledger = open_ledger(url)
        try:
            _, short = await ledger.create_key("short", worst - 1)
            exact_record, exact = await ledger.create_key("exact", worst)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                         timeout=60) as client:
                refused = await client.post("/v1/completions", json=body, headers={"x-api-key": short})
                paid = await client.post("/v1/completions", json=body, headers={"x-api-key": exact})
            await accounts.close()
            costs = [u.cost_micro for u in await ledger.usage(exact_record.key_id)]
            return refused, paid, costs, await ledger.open_reservations()
        finally:
            await ledger.close()

    refused, paid, costs, still_open = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert "7 prompt tokens + 16 completion tokens" in refused.json()["error"]["message"]
    assert _ok(paid)["usage"]["completion_tokens"] == 16 and paid.headers["x-remaining-credits"] == "0.000000"
    assert costs == [worst] and still_open == 0
