"""The engine: continuous batching, paged cache, preemption, prefix caching, seeds, stops, aborts, n > 1."""

import asyncio

import pytest
import torch

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import ContextLengthError, RequestError
from cluster.engine.sampling_params import SamplingParams
from cluster.generate import greedy_generate


# Each engine test runs in series and with steps scheduled ahead (`EngineConfig.async_scheduling`).
pytestmark = pytest.mark.both_schedulings


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts(count: int, lo: int = 1, hi: int = 90, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (count,), generator=g).tolist()
    return [torch.randint(3, 32768, (n,), generator=g).tolist() for n in lengths]


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], later: dict | None = None,
         at_step: int = 3) -> dict[tuple[str, int], dict]:
    """Drive the engine to completion; `later` requests arrive at step `at_step`. Returns per-choice results."""
    results: dict[tuple[str, int], dict] = {}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    step = 0
    while engine.has_work():
        for out in engine.step():
            r = results.setdefault((out.request_id, out.index), {"tokens": [], "text": "", "logprobs": []})
            r["tokens"] += out.token_ids
            r["text"] += out.text
            r["logprobs"] += out.logprobs
            if out.finished:
                r["finish"], r["usage"] = out.finish_reason, (out.prompt_tokens, out.completion_tokens)
                r["cached"] = out.cached_prompt_tokens
        step += 1
        if step == at_step and later:
            for rid, (prompt, params) in later.items():
                engine.add_request(rid, prompt, params)
    return results


def _visible(results: dict) -> dict:
    """What a client sees of each choice (cache statistics aside)."""
    return {k: (v["tokens"], v["text"], v["finish"], v["usage"]) for k, v in results.items()}


def test_continuous_batching_equals_one_at_a_time(make_engine, model):
    prompts = _prompts(12)
    engine = make_engine(max_num_batched_tokens=64, max_num_seqs=8)  # chunked prefills, a bounded batch
    first = {str(i): (p, GREEDY) for i, p in enumerate(prompts[:6])}
    later = {str(i): (p, GREEDY) for i, p in enumerate(prompts[6:], 6)}
    results = _run(engine, first, later, at_step=4)
    for i, p in enumerate(prompts):
        r = results[(str(i), 0)]
        assert r["tokens"] == list(greedy_generate(model, p, 24))
        assert r["finish"] == "length" and r["usage"] == (len(p), 24)


def test_preemption_resumes_with_the_same_tokens(make_engine):
    prompts = _prompts(8, 30, 60, seed=1)
    sampled = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    requests = {str(i): (p, GREEDY if i % 2 else sampled) for i, p in enumerate(prompts)}
    roomy = _run(make_engine(), requests)
    tight_engine = make_engine(blocks=24)  # 8 sequences of ~5 blocks each cannot all stay
    tight = _run(tight_engine, requests)
    assert tight_engine.scheduler.num_preemptions > 0
    assert _visible(tight) == _visible(roomy)


def test_prefix_cache_hits_give_the_same_tokens(make_engine):
    system = _prompts(1, 70, 71, seed=2)[0]  # 70 shared tokens = 4 full blocks
    tails = _prompts(4, 3, 20, seed=3)
    requests = {str(i): (system + t, GREEDY) for i, t in enumerate(tails)}
    cached = make_engine()
    _run(cached, {"warm": (system + [7, 8, 9], GREEDY)})
    hits_before = cached.blocks.prefix_hit_tokens
    with_cache = _run(cached, requests)
    assert cached.blocks.prefix_hit_tokens - hits_before == 4 * 64  # every request reused the 4 full blocks
    assert all(with_cache[(str(i), 0)]["cached"] == 64 for i in range(4))
    without = _run(make_engine(enable_prefix_caching=False), requests)
    assert {k: v["tokens"] for k, v in with_cache.items()} == {k: v["tokens"] for k, v in without.items()}


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(make_engine):
    prompt = _prompts(1, 20, 21, seed=4)[0]
    params = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, seed=1234, ignore_eos=True,
                            frequency_penalty=0.5)
    alone = _run(make_engine(), {"me": (prompt, params)})[("me", 0)]["tokens"]
    crowd = {str(i): (p, SamplingParams(max_tokens=10 + i, temperature=0.3 + i / 20, top_p=0.8, seed=i,
                                        ignore_eos=True)) for i, p in enumerate(_prompts(15, seed=5))}
    crowd["me"] = (prompt, params)
    assert _run(make_engine(max_num_batched_tokens=128), crowd)[("me", 0)]["tokens"] == alone
    other_seed = _run(make_engine(), {"me": (prompt, SamplingParams(**{**params.__dict__, "seed": 99}))})
    assert other_seed[("me", 0)]["tokens"] != alone


def test_stop_string_across_token_boundaries(make_engine, tok):
    prompt = _prompts(1, 10, 11, seed=6)[0]
    full = _run(make_engine(), {"a": (prompt, GREEDY)})[("a", 0)]
    tokens = full["tokens"]
    # A stop string made of the end of token 5's text and the start of token 6's: it spans a boundary.
    upto5, upto6 = tok.decode(tokens[:6]), tok.decode(tokens[:7])
    stop = upto5[-2:] + upto6[len(upto5):][:2]
    assert len(stop) >= 3 and stop in full["text"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=("never-there", stop))
    r = _run(make_engine(), {"a": (prompt, params)})[("a", 0)]
    assert r["finish"] == "stop"
    assert r["text"] == full["text"][:full["text"].index(stop)]
    assert stop not in r["text"]


@pytest.mark.parametrize("cut", ["at a token boundary", "inside a token"])
def test_the_tokens_and_logprobs_handed_out_spell_the_content_up_to_a_stop_string(make_engine, tok, cut):
    """A stop string's tokens are not handed out (nor their logprobs); a token holding content before it is."""
    prompt = _prompts(1, 10, 11, seed=6)[0]
    full = _run(make_engine(), {"a": (prompt, GREEDY)})[("a", 0)]
    tokens = full["tokens"]
    before, through = tok.decode(tokens[:5]), tok.decode(tokens[:8])
    stop = through[len(before):] if cut == "at a token boundary" else through[len(before) - 1:]
    assert full["text"].index(stop) == len(before) - (cut != "at a token boundary")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,), logprobs=True)
    r = _run(make_engine(), {"a": (prompt, params)})[("a", 0)]
    assert r["finish"] == "stop" and r["text"] == full["text"][:full["text"].index(stop)]
    assert r["tokens"] == tokens[:5] and len(r["logprobs"]) == 5
    assert tok.decode(r["tokens"]).startswith(r["text"])


def test_max_tokens_text_equals_the_decode(make_engine, tok):
    r = _run(make_engine(), {"a": (_prompts(1, seed=7)[0], GREEDY)})[("a", 0)]
    assert r["text"] == tok.decode(r["tokens"])


def test_eos_and_stop_token_ids_finish_with_stop(make_engine, model):
    prompt = _prompts(1, 12, 13, seed=8)[0]
    expected = list(greedy_generate(model, prompt, 24))
    stop_at = expected[9]
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(stop_at,))
    r = _run(make_engine(), {"a": (prompt, params)})[("a", 0)]
    # The stop token ends the choice and counts as generated, but it is not content: no output carries it.
    end = expected.index(stop_at)
    assert r["finish"] == "stop" and r["tokens"] == expected[:end] and r["usage"][1] == end + 1


def test_aborts_mid_prefill_and_mid_decode_free_everything(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    long_prompt = _prompts(1, 80, 81, seed=9)[0]
    engine.add_request("prefill", long_prompt, GREEDY)
    engine.add_request("decode", [5, 6, 7], GREEDY)
    engine.step()
    seq = engine.requests["prefill"][0]
    assert 0 < seq.num_computed < len(long_prompt)
    outs = engine.abort("prefill")
    assert [o.finish_reason for o in outs] == ["abort"]
    for _ in range(4):
        engine.step()
    assert len(engine.requests["decode"][0].output) > 0
    engine.abort("decode")
    engine.abort("never-existed")
    assert not engine.has_work()


def test_requests_that_can_never_run_are_refused(make_engine):
    engine = make_engine(blocks=4)  # 64 tokens of cache
    with pytest.raises(RequestError, match="needs 5 KV-cache blocks .* holds only 4"):
        engine.add_request("big", [1] * 50, SamplingParams(max_tokens=20))
    context = engine.context_len
    with pytest.raises(ContextLengthError, match=f"plus max_tokens \\(100\\) is {context + 60} tokens.*{context}"):
        engine.add_request("long", [1] * (context - 40), SamplingParams(max_tokens=100))
    with pytest.raises(ContextLengthError, match=f"the prompt has {context} tokens"):
        engine.add_request("longer", [1] * context, SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="at least one token"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(RequestError, match="token ids must be in"):
        engine.add_request("bad", [1, 40000], SamplingParams())


def test_n_choices_share_the_prompt_blocks(make_engine):
    prompt = _prompts(1, 50, 51, seed=10)[0]  # 3 full blocks
    engine = make_engine()
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=40, n=3, ignore_eos=True)
    results = _run(engine, {"n": (prompt, params)})
    assert engine.blocks.prefix_hit_tokens == 2 * 48  # choices 1 and 2 reused choice 0's full prompt blocks
    for i in range(3):
        single = SamplingParams(**{**params.__dict__, "n": 1, "seed": 40 + i})
        assert results[("n", i)]["tokens"] == _run(make_engine(), {"s": (prompt, single)})[("s", 0)]["tokens"]
    assert len({tuple(results[("n", i)]["tokens"]) for i in range(3)}) == 3


def test_logprobs_come_with_each_token(make_engine, model):
    prompt = _prompts(1, 9, 10, seed=11)[0]
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True)
    r = _run(make_engine(), {"a": (prompt, params)})[("a", 0)]
    assert len(r["logprobs"]) == 5
    for token, lp in zip(r["tokens"], r["logprobs"]):
        assert lp.top[0][0] == token and lp.logprob == pytest.approx(lp.top[0][1])  # greedy picks the top one
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_async_front_streams_and_aborts_on_disconnect(make_engine, tok):
    engine = make_engine()
    front = AsyncEngine(lambda: engine)
    assert front.call(lambda e: e.stats().free_blocks).result() == engine.blocks.num_blocks

    async def scenario():
        stream = await front.add_request("full", tok.encode("Hola", bos=True), GREEDY)
        deltas = [d async for d in stream]
        # A client that stops reading after two deltas: the request is aborted and its blocks freed.
        partial = await front.add_request("gone", tok.encode("Bonjour", bos=True), SamplingParams(max_tokens=500))
        seen = 0
        async for _ in partial:
            seen += 1
            if seen == 2:
                break
        await partial.aclose()
        with pytest.raises(ContextLengthError):
            await front.add_request("huge", [1] * 10, SamplingParams(max_tokens=10**6))
        for _ in range(200):
            if not engine.has_work():
                break
            await asyncio.sleep(0.01)
        return deltas

    try:
        deltas = asyncio.run(scenario())
    finally:
        front.shutdown()
    assert deltas[-1].finish_reason == "length" and sum(len(d.token_ids) for d in deltas) == 24
    assert not engine.requests


def test_async_front_hands_a_steps_outputs_to_an_event_loop_at_once(make_engine, tok):
    """Eight streams on one event loop: one wake-up of that loop per engine step, not one per output."""
    engine = make_engine()
    steps_with_outputs = 0
    step = engine.step

    def counting_step():
        nonlocal steps_with_outputs
        outs = step()
        steps_with_outputs += bool(outs)
        return outs

    engine.step = counting_step
    front = AsyncEngine(lambda: engine)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[int, list[int]]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            nonlocal wakeups
            wakeups += 1
            return schedule(*args, **kwargs)

        loop.call_soon_threadsafe = counting
        streams = [await front.add_request(f"r{i}", tok.encode(f"Hola {i}", bos=True), params) for i in range(8)]

        async def tokens(stream) -> int:
            return sum([len(d.token_ids) async for d in stream])

        counts = await asyncio.gather(*(tokens(s) for s in streams))
        loop.call_soon_threadsafe = schedule
        return wakeups, counts

    try:
        wakeups, counts = asyncio.run(scenario())
    finally:
        front.shutdown()
    assert counts == [6] * 8
    assert 0 < wakeups <= steps_with_outputs  # 8 outputs a step, one hand-off


def test_async_front_reports_a_failing_factory():
    def broken():
        raise RuntimeError("no weights here")

    with pytest.raises(RuntimeError, match="no weights here"):
        AsyncEngine(broken)


def test_a_failed_step_fails_its_requests_and_the_loop_goes_on(make_engine, tok):
    engine = make_engine()
    run = engine.runner.run
    calls = {"n": 0}

    def fail_once(batch):  # fault injection: the second forward raises
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return run(batch)

    engine.runner.run = fail_once
    front = AsyncEngine(lambda: engine)

    async def scenario():
        first = [d async for d in await front.add_request("a", tok.encode("Hi", bos=True), GREEDY)]
        second = [d async for d in await front.add_request("b", tok.encode("Hi", bos=True), GREEDY)]
        return first, second

    try:
        first, second = asyncio.run(scenario())
    finally:
        front.shutdown()
    assert first[-1].finish_reason == "error" and "device lost" in first[-1].error
    assert second[-1].finish_reason == "length" and sum(len(d.token_ids) for d in second) == 24


def test_shutdown_ends_running_requests_with_an_error(make_engine, tok):
    engine = make_engine()
    front = AsyncEngine(lambda: engine)

    async def scenario():
        stream = await front.add_request("long", tok.encode("Hola", bos=True),
                                         SamplingParams(max_tokens=2000, ignore_eos=True))
        first = await stream.__anext__()
        await asyncio.to_thread(front.shutdown)
        rest = [out async for out in stream]  # ends instead of waiting forever
        return first, rest

    first, rest = asyncio.run(scenario())
    assert first.finish_reason is None
    assert rest[-1].finish_reason == "error" and rest[-1].error_status == 503
