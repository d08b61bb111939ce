"""Prompt logprobs in the engine (`SamplingParams.prompt_logprobs`, the legacy completions' echo): each prompt token's
logprob and top alternatives equal the log-softmax of one fp32 full forward of the tiny checkpoint at the position
before it, however the prompt is chunked, sliced, preempted or cached; every choice reports them; max_tokens 0 scores
the prompt alone."""

import asyncio
import dataclasses

import pytest
import torch

from cluster.engine import prompt_logprobs
from cluster.engine.outputs import RequestOutput, TokenLogprobs
from cluster.engine.sampling_params import SamplingParams
from cluster.model.kv_cache import ContiguousKVCache
from cluster.serve.engine_backend import final_outputs


# Each engine test runs in series and with steps scheduled ahead (`EngineConfig.async_scheduling`).
pytestmark = pytest.mark.both_schedulings


ATOL = 1e-5


def _prompt(model, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()


def _reference(model, prompt: list[int]) -> torch.Tensor:
    """[L, V] log-softmax of the logits of one full forward over the prompt (fp32, a contiguous cache)."""
    c = model.config
    cache = ContiguousKVCache(c.num_layers, 1, len(prompt), c.num_kv_heads, c.head_dim)
    positions = cache.begin_step([0], [len(prompt)])
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(prompt), positions, cache)).log_softmax(dim=-1)


def _assert_scores(scores: list[TokenLogprobs | None] | None, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    assert scores is not None and len(scores) == len(prompt)
    assert scores[0] is None  # nothing predicts the first token
    want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    got = torch.tensor([s.logprob for s in scores[1:]])
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    top = ref[:-1].topk(k, dim=-1)
    assert [[t for t, _ in s.top] for s in scores[1:]] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in s.top] for s in scores[1:]]).reshape(top.values.shape),
                               top.values, rtol=0, atol=ATOL)


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[RequestOutput]]:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outs: dict[str, list[RequestOutput]] = {r: [] for r in requests}
    while engine.has_work():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def _first_outputs(outs: list[RequestOutput]) -> dict[int, RequestOutput]:
    firsts: dict[int, RequestOutput] = {}
    for out in outs:
        firsts.setdefault(out.index, out)
    return firsts


def test_prompt_logprobs_equal_a_full_forward_over_chunks_and_slices(make_engine, model, monkeypatch):
    """A 70-token prompt in chunks of 32 rows, its rows through the lm_head 8 at a time, greedy and sampled; the
    scores come once, with each choice's first output, and leave the generated tokens as they were."""
    monkeypatch.setattr(prompt_logprobs, "SCORE_ROWS", 8)
    prompt = _prompt(model, 70, seed=1)
    ref = _reference(model, prompt)
    for params in (SamplingParams(max_tokens=5, temperature=0, logprobs=True, top_logprobs=1),
                   SamplingParams(max_tokens=5, temperature=0.9, seed=7, n=2)):
        engine = make_engine(max_num_batched_tokens=32)
        scored = dataclasses.replace(params, prompt_logprobs=3)
        outs = _run(engine, {"plain": (prompt, params), "scored": (prompt, scored)})
        assert all(o.prompt_logprobs is None for o in outs["plain"])
        firsts = _first_outputs(outs["scored"])
        assert sorted(firsts) == list(range(params.n))
        for out in firsts.values():
            _assert_scores(out.prompt_logprobs, prompt, ref, 3)
        assert sum(o.prompt_logprobs is not None for o in outs["scored"]) == params.n  # once per choice
        for i in range(params.n):
            tokens = {name: [t for o in outs[name] if o.index == i for t in o.token_ids] for name in outs}
            assert len(tokens["plain"]) == 5 and tokens["scored"] == tokens["plain"]


def test_a_scoring_choice_computes_its_cached_prompt_and_the_others_reuse_it(make_engine, model):
    """Cached blocks have no logits: the choice that scores recomputes a cached prompt (and scores it right); the
    request's other choices start from the cache and report the same scores."""
    prompt = _prompt(model, 50, seed=2)
    ref = _reference(model, prompt)
    engine = make_engine()
    _run(engine, {"warm": (prompt, SamplingParams(max_tokens=1, temperature=0))})
    outs = _run(engine, {"scored": (prompt, SamplingParams(max_tokens=2, temperature=0, n=3, prompt_logprobs=2)),
                         "cached": (prompt, SamplingParams(max_tokens=2, temperature=0))})
    firsts = _first_outputs(outs["scored"])
    assert firsts[0].cached_prompt_tokens == 0
    assert firsts[1].cached_prompt_tokens == firsts[2].cached_prompt_tokens == 48  # 3 full blocks of 16
    assert outs["cached"][0].cached_prompt_tokens == 48  # the cache itself is still used by everyone else
    for out in firsts.values():
        _assert_scores(out.prompt_logprobs, prompt, ref, 2)


def test_max_tokens_zero_scores_the_prompt_alone(make_engine, model):
    prompt = _prompt(model, 20, seed=3)
    ref = _reference(model, prompt)
    engine = make_engine()
    outs = _run(engine, {"scored": (prompt, SamplingParams(max_tokens=0, temperature=0, n=2, prompt_logprobs=0)),
                         "echo": (prompt, SamplingParams(max_tokens=0, seed=1))})
    for name in outs:
        assert sorted(o.index for o in outs[name]) == ([0, 1] if name == "scored" else [0])  # one output a choice
        for out in outs[name]:
            assert (out.finish_reason, out.token_ids, out.text, out.completion_tokens) == ("length", [], "", 0)
            assert out.prompt_tokens == len(prompt)
    for out in outs["scored"]:
        _assert_scores(out.prompt_logprobs, prompt, ref, 0)
    assert outs["echo"][0].prompt_logprobs is None  # not asked for: not computed


def test_a_prompt_preempted_mid_prefill_is_scored_once(make_engine, model, monkeypatch):
    """Two scoring requests on a cache too small for both: the later one is preempted while its prompt is partly
    computed (and scored), recomputes it from the start, and still scores each token once, right."""
    prompts = {"a": _prompt(model, 79, seed=4), "b": _prompt(model, 100, seed=5)}
    engine = make_engine(blocks=10, max_num_batched_tokens=32)
    seen: list[tuple[int, int]] = []  # (prompt tokens scored, of) at each preemption
    preempt = engine.scheduler._preempt
    monkeypatch.setattr(engine.scheduler, "_preempt", lambda seq: (
        seen.append((len(seq.prompt_logprobs or []), len(seq.prompt))), preempt(seq)))
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=1)
    outs = _run(engine, {name: (prompt, params) for name, prompt in prompts.items()})
    assert any(1 < scored < of for scored, of in seen), seen
    for name, prompt in prompts.items():
        _assert_scores(outs[name][0].prompt_logprobs, prompt, _reference(model, prompt), 1)
        assert sum(len(o.token_ids) for o in outs[name]) == 20


def test_single_token_prompt_chunks_are_scored_outside_decode_buckets(make_engine, model):
    """With a budget of 2 tokens a step, a prompt is prefilled a token at a time beside another sequence's decode:
    steps of single-token rows, which decode buckets (static buffers, CUDA graphs) would take and which compute the
    logits of the sampling rows only. The scoring sequence's steps run over their own rows."""
    prompt = _prompt(model, 12, seed=6)
    engine = make_engine(max_num_batched_tokens=2)
    engine.runner.decode_buckets = (1, 2, 4, 8)  # the padded decode path, eagerly (no graphs on a CPU)
    engine.add_request("decoding", _prompt(model, 2, seed=7), SamplingParams(max_tokens=40, temperature=0))
    while not engine.scheduler.running or engine.scheduler.running[0].num_computed < 2:
        engine.step()
    outs = _run(engine, {"scored": (prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))})
    _assert_scores(outs["scored"][0].prompt_logprobs, prompt, _reference(model, prompt), 1)


def test_merged_deltas_keep_the_prompt_logprobs(make_engine, model):
    """Serve's non-streamed path hands each choice on as one output, its deltas merged (`final_outputs`): the scores
    of its first delta stay."""
    prompt = _prompt(model, 20, seed=8)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, n=2, prompt_logprobs=1)
    outs = _run(make_engine(), {"r": (prompt, params)})["r"]
    assert len(outs) == 6  # three deltas a choice

    async def merge() -> list[RequestOutput]:
        async def deltas():
            for out in outs:
                yield out

        return [out async for out in final_outputs(deltas())]

    merged = asyncio.run(merge())
    assert sorted(o.index for o in merged) == [0, 1]
    ref = _reference(model, prompt)
    for out in merged:
        _assert_scores(out.prompt_logprobs, prompt, ref, 1)
