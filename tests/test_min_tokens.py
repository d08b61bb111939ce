"""vLLM's min_tokens and stop_token_ids in the engine (issue 24): EOS and stop_token_ids cannot end the output, nor a
stop string stop it, before min_tokens tokens; the token that ends a choice is counted and reported with its
logprobs (`RequestOutput.stop_token`) but is not among the content's tokens."""

import pytest

from cluster.engine.engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.stop import StopStringFilter
from cluster.generate import greedy_generate


# Each engine test runs in series and with steps scheduled ahead (`EngineConfig.async_scheduling`).
pytestmark = pytest.mark.both_schedulings


PROMPT = list(range(100, 116))


def _run(engine: LLMEngine, params: SamplingParams) -> dict:
    """One request driven to its end: its content, content tokens, logprobs, finish, count and ending token."""
    engine.add_request("r", PROMPT, params)
    r: dict = {"text": "", "tokens": [], "logprobs": []}
    while engine.has_work():
        for out in engine.step():
            r["text"] += out.text
            r["tokens"] += out.token_ids
            r["logprobs"] += out.logprobs
            if out.finished:
                r |= {"finish": out.finish_reason, "count": out.completion_tokens, "stop_token": out.stop_token,
                      "stop_logprobs": out.stop_token_logprobs}
    return r


# -- stop strings ---------------------------------------------------------------------------------------------------
def test_a_stop_completed_before_min_tokens_is_content():
    f = StopStringFilter(("END",))
    assert [f.push("aEND", can_stop=False), f.push("bE", can_stop=False), f.push("ND!")] == ["aEND", "b", ""]
    assert f.stopped  # "END" completed in the first allowed delta, though it started before


def test_a_stop_held_from_before_min_tokens_stops_only_if_it_ends_later():
    """Stops "a" and "xab": "xa" is held as a possible "xab" and holds a whole "a" pushed while stops were off."""
    f = StopStringFilter(("a", "xab"))
    assert f.push("xa", can_stop=False) == ""
    assert f.push("c") == "xac" and not f.stopped  # the "a" inside never stops
    f = StopStringFilter(("a", "xab"))
    f.push("xa", can_stop=False)
    assert f.push("b") == "" and f.matched == "xab"


def test_min_tokens_defers_a_stop_string_as_vllm_does(make_engine, tok, model):
    """A stop string that ends in token k stops the output when k > min_tokens, and is content otherwise."""
    ids = list(greedy_generate(model, PROMPT, 8))
    texts = [tok.decode(ids[:k]) for k in range(9)]
    # the first token whose text completes a stop string found nowhere before it
    k = next(k for k in range(2, 8) if texts[k][len(texts[k - 1]):].strip()
             and texts[k][len(texts[k - 1]):] not in texts[k - 1])
    stop = texts[k][len(texts[k - 1]):]
    base = dict(max_tokens=8, temperature=0, ignore_eos=True, stop=(stop,))
    stopped = _run(make_engine(), SamplingParams(**base, min_tokens=k - 1))
    assert (stopped["finish"], stopped["count"], stopped["text"]) == ("stop", k, texts[k - 1])
    deferred = _run(make_engine(), SamplingParams(**base, min_tokens=k))
    assert deferred["text"].startswith(texts[k]) and deferred["count"] > k


# -- EOS and stop_token_ids ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_tokens", [0, 1, 5])
def test_min_tokens_holds_back_the_eos_the_model_wants(make_engine, tok, min_tokens):
    params = SamplingParams(max_tokens=10, temperature=0, logit_bias=((tok.eos_id, 100.0),), min_tokens=min_tokens,
                            logprobs=True)
    r = _run(make_engine(), params)
    assert (r["finish"], r["count"], r["stop_token"]) == ("stop", min_tokens + 1, tok.eos_id)
    assert len(r["tokens"]) == len(r["logprobs"]) == min_tokens and tok.eos_id not in r["tokens"]
    assert r["stop_logprobs"] is not None and r["stop_logprobs"].logprob <= 0


def test_min_tokens_holds_back_stop_token_ids_and_eos_together(make_engine, tok, model):
    ids = list(greedy_generate(model, PROMPT, 4))
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(ids[0], ids[1]), min_tokens=3,
                            logit_bias=((tok.eos_id, 100.0), (ids[0], 90.0)))
    r = _run(make_engine(), params)
    assert r["count"] == 4 and r["finish"] == "stop" and r["stop_token"] == tok.eos_id
    assert not {ids[0], ids[1], tok.eos_id} & set(r["tokens"])


def test_ignore_eos_leaves_eos_in_the_content_and_bans_only_stop_token_ids(make_engine, tok):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logit_bias=((tok.eos_id, 100.0),),
                            min_tokens=2)
    r = _run(make_engine(), params)
    assert (r["finish"], r["count"], r["stop_token"], r["tokens"]) == ("length", 4, None, [tok.eos_id] * 4)


def test_a_stop_token_is_reported_not_handed_out(make_engine, model):
    ids = list(greedy_generate(model, PROMPT, 6))
    stop_at = ids[3]
    end = ids.index(stop_at)
    r = _run(make_engine(), SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(stop_at,), logprobs=True))
    assert (r["tokens"], r["count"], r["stop_token"]) == (ids[:end], end + 1, stop_at)
    assert len(r["logprobs"]) == end and r["stop_logprobs"] is not None


def test_stop_token_ids_outside_the_vocabulary_are_refused(make_engine, model):
    from cluster.engine.outputs import RequestError

    with pytest.raises(RequestError, match="stop_token_ids"):
        make_engine().validate(PROMPT, SamplingParams(stop_token_ids=(model.config.vocab_size,)))


def test_min_tokens_is_bounded_by_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
    assert SamplingParams(max_tokens=3, min_tokens=3).min_tokens == 3
