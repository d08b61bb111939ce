"""Steps scheduled ahead of their predecessor's outputs (`EngineConfig.async_scheduling`): the next step is laid out
and launched while the last one's tokens are still on the device, its pending inputs read there, and every client
sees what it sees when each step is handed out before the next is scheduled."""

import llguidance
import pytest
import torch

from cluster.engine.engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams


NAMED = {"type": "object", "properties": {"name": {"type": "string", "minLength": 6}}, "required": ["name"]}


def _prompts(count: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32768, (int(n),), generator=g).tolist() for n in torch.randint(lo, hi, (count,),
                                                                                             generator=g)]


def _drive(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    """Every choice's tokens, text, logprobs, finish and usage, driving `engine` until it has no work."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    seen: dict = {}
    while engine.has_work():
        for out in engine.step():
            r = seen.setdefault((out.request_id, out.index), {"tokens": [], "text": "", "logprobs": []})
            r["tokens"] += out.token_ids
            r["text"] += out.text
            r["logprobs"] += [(lp.logprob, lp.top) for lp in out.logprobs]
            if out.finished:
                r["finish"], r["usage"] = out.finish_reason, (out.prompt_tokens, out.completion_tokens)
    return seen


def _record_runs(engine: LLMEngine) -> list[list[tuple[str, int]]]:
    """For each step the runner runs: (request id, pending tokens) of each scheduled sequence, as it is run."""
    runs: list[list[tuple[str, int]]] = []
    run = engine.runner.run

    def recording(batch):
        runs.append([(s.seq.request_id, s.seq.pending) for s in batch.scheduled])
        return run(batch)

    engine.runner.run = recording
    return runs


def _tokens_of(make_engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return _drive(make_engine(async_scheduling=False), {"probe": (prompt, params)})[("probe", 0)]["tokens"]


def _mixed(make_engine) -> dict[str, tuple[list[int], SamplingParams]]:
    prompts = _prompts(10, 5, 60, seed=21)
    plain = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=30, temperature=1.0, seed=6, ignore_eos=True)
    stop_id = _tokens_of(make_engine, prompts[5], sampled)[7]  # ends that choice at its 8th token or before
    early = _tokens_of(make_engine, prompts[6], sampled)[:4]  # tokens min_tokens must hold back
    return {
        "greedy": (prompts[0], plain),
        "seeded": (prompts[1], SamplingParams(max_tokens=18, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)),
        "n3": (prompts[2], SamplingParams(max_tokens=12, temperature=1.0, seed=8, n=3, ignore_eos=True)),
        "logprobs": (prompts[3], SamplingParams(max_tokens=15, temperature=0, logprobs=True, top_logprobs=3,
                                                ignore_eos=True)),
        "stop": (prompts[4], SamplingParams(max_tokens=30, temperature=0.7, seed=5, stop=("e", "a"))),
        "stop_id": (prompts[5], SamplingParams(max_tokens=30, temperature=1.0, seed=6, stop_token_ids=(stop_id,))),
        "min_tokens": (prompts[6], SamplingParams(max_tokens=9, min_tokens=6, temperature=1.0, seed=6,
                                                  stop_token_ids=tuple(early))),
        "penalised": (prompts[7], SamplingParams(max_tokens=16, temperature=0.8, seed=9, frequency_penalty=1.0,
                                                 presence_penalty=0.5, ignore_eos=True)),
        "one": (prompts[8], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)),
        "long": (prompts[9] * 3, SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)),
    }


@pytest.mark.parametrize("static", [False, True], ids=["eager", "buckets"])
@pytest.mark.parametrize("blocks", [256, 14], ids=["roomy", "preempting"])
def test_scheduled_ahead_every_client_sees_the_same(make_engine, blocks, static):
    """`buckets`: decode steps over the static buffers CUDA graphs replay (run eagerly here), pending tokens
    written into them on the device."""
    requests = _mixed(make_engine)
    in_series = make_engine(blocks=blocks, max_num_batched_tokens=64, async_scheduling=False)
    ahead = make_engine(blocks=blocks, max_num_batched_tokens=64, async_scheduling=True)
    if static:
        ahead.runner.decode_buckets = (1, 2, 4, 8, 16, 32, 64)
    runs = _record_runs(ahead)
    expected, got = _drive(in_series, requests), _drive(ahead, requests)
    assert got == expected
    assert set(got) == {(rid, i) for rid, (_, p) in requests.items() for i in range(p.n)}
    assert got[("stop_id", 0)]["finish"] == "stop" and got[("stop", 0)]["finish"] == "stop"
    assert any(pending for run in runs for _, pending in run)  # steps did run ahead of their tokens
    if blocks == 14:
        assert ahead.scheduler.num_preemptions > 0


def test_the_next_step_runs_before_the_tokens_it_reads_are_on_the_host(make_engine):
    """Each call launches a step and hands out the one before it: a decode step runs with its input token still
    pending, and the outputs of a call are the previous step's."""
    engine = make_engine(async_scheduling=True)
    runs = _record_runs(engine)
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert engine.step() == []  # the prefill is launched; nothing is read back yet
    first = engine.step()  # the first decode launched with its input pending; the prefill's token handed out
    assert [len(o.token_ids) for o in first] == [1]
    assert runs == [[("a", 0)], [("a", 1)]]
    while engine.has_work():
        engine.step()
    assert len(runs) == 6  # the prompt, then 5 decodes: nothing computed past max_tokens


def test_a_step_computes_nothing_past_max_tokens_or_the_context(make_engine):
    engine = make_engine(async_scheduling=True)
    runs = _record_runs(engine)
    context = engine.context_len
    _drive(engine, {"short": ([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
                    "edge": ([4] * (context - 4), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))})
    decodes = [rid for run in runs for rid, pending in run if pending]  # a prompt's chunks have none pending
    assert decodes.count("short") == 2 and decodes.count("edge") == 3  # after the prompt, max_tokens - 1 decodes


def test_rows_that_need_their_tokens_on_the_host_wait_for_them(make_engine, tok):
    """Penalties count the output's tokens, and a grammar's mask follows them: such a sequence's next step is laid
    out after its token is read back, never with it pending."""
    engine = make_engine(guided=True, async_scheduling=True)
    runs = _record_runs(engine)
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    penalised = SamplingParams(max_tokens=12, temperature=0.8, seed=1, presence_penalty=1.0, ignore_eos=True)
    guided = SamplingParams(max_tokens=24, temperature=0.8, seed=2,
                            grammar=llguidance.LLMatcher.grammar_from_json_schema(NAMED))
    _drive(engine, {"plain": ([3, 4, 5], plain), "penalised": ([6, 7], penalised), "guided": ([8, 9], guided)})
    pending = {rid: [p for run in runs for r, p in run if r == rid] for rid in ("plain", "penalised", "guided")}
    assert not any(pending["penalised"]) and not any(pending["guided"])
    assert len(pending["penalised"]) >= 12 and len(pending["guided"]) >= 2  # they did run, many steps
    assert len(pending["plain"]) == 12  # a step with such rows hands out before the next: no wasted row
