"""The batched sampler against hand-computed distributions; seeded draws independent of the batch; raw logprobs."""

import itertools
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import cluster.engine.sampler as sampler_module
from cluster.engine.sampler import Sampler, SamplingRow, make_generator, unpack_bitmask
from cluster.engine.sampling_params import SamplingParams

# A distribution with easy numbers: logits are the log-probabilities, deliberately not in sorted order.
P = [0.15, 0.4, 0.04, 0.25, 0.1, 0.06]
LOGITS = [math.log(p) for p in P]
DRAWS = 20000
TOL = 0.015  # > 4 standard deviations of an empirical frequency over DRAWS draws


@pytest.fixture(autouse=True)
def _os_seeds_from_a_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generator made without a seed (a row's, or the sampler's shared one) takes its seed from the OS; here from a
    counter instead, so the frequency checks reproduce while every such generator still gets a seed of its own."""
    seeds = itertools.count(1000)
    monkeypatch.setattr(sampler_module, "secrets", SimpleNamespace(randbits=lambda bits: next(seeds)))


def _row(**kw) -> SamplingRow:
    params = SamplingParams(**kw)
    return SamplingRow(params, [], None if params.greedy else make_generator(params.seed))


def _probs(logits: list[float], row: SamplingRow) -> list[float]:
    return Sampler().probabilities(torch.tensor([logits]), [row])[0].tolist()


def _normalise(weights: dict[int, float], V: int) -> list[float]:
    total = sum(weights.values())
    return [weights.get(t, 0.0) / total for t in range(V)]


def _frequencies(logits: list[float], row: SamplingRow, n: int = DRAWS) -> dict[int, float]:
    """Empirical token frequencies of n draws: n rows sharing one generator, in one batch."""
    rows = [SamplingRow(row.params, row.output_token_ids, row.generator, row.allowed, row.banned) for _ in range(n)]
    out = Sampler()(torch.tensor([logits] * n), rows)
    return {t: c / n for t, c in Counter(out.token_ids).items()}


def _check(logits: list[float], row: SamplingRow, expected: list[float]) -> None:
    """The processed distribution matches `expected`, and so do the draws: same support, close frequencies."""
    assert _probs(logits, row) == pytest.approx(expected, abs=1e-6)
    freq = _frequencies(logits, row)
    assert set(freq) == {t for t, p in enumerate(expected) if p > 0}
    for t, p in enumerate(expected):
        assert abs(freq.get(t, 0.0) - p) < TOL, (t, freq.get(t), p)


def test_temperature_one_is_the_softmax():
    _check(LOGITS, _row(temperature=1.0, seed=0), P)


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        _check(LOGITS, _row(temperature=t, seed=1), _normalise({i: p ** (1 / t) for i, p in enumerate(P)}, 6))


def test_top_k_keeps_the_k_largest():
    # 0.4 (token 1), 0.25 (token 3), 0.15 (token 0) survive, renormalised over 0.8.
    _check(LOGITS, _row(top_k=3, seed=2), _normalise({1: 0.4, 3: 0.25, 0: 0.15}, 6))
    assert _probs(LOGITS, _row(top_k=100, seed=2)) == pytest.approx(P, abs=1e-6)  # k > V keeps everything


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Cumulative 0.4, 0.65, 0.80: 0.75 needs the third token; 0.6 needs two.
    _check(LOGITS, _row(top_p=0.75, seed=3), _normalise({1: 0.4, 3: 0.25, 0: 0.15}, 6))
    _check(LOGITS, _row(top_p=0.6, seed=4), _normalise({1: 0.4, 3: 0.25}, 6))
    # Below the top token's probability the top token alone is kept.
    _check(LOGITS, _row(top_p=0.1, seed=5), _normalise({1: 1.0}, 6))
    assert _probs(LOGITS, _row(top_p=1.0, seed=5)) == pytest.approx(P, abs=1e-6)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # top_k=2 leaves 0.4/0.65 = 0.615 and 0.385; top_p=0.6 is then reached by the first token alone
    # (on the original distribution it would have needed two).
    _check(LOGITS, _row(top_k=2, top_p=0.6, seed=6), _normalise({1: 1.0}, 6))


def test_min_p_after_temperature():
    # T=2: weights sqrt(p); min_p=0.6 keeps sqrt(p) >= 0.6 * sqrt(0.4), i.e. p >= 0.144: tokens 1, 3, 0.
    _check(LOGITS, _row(temperature=2.0, min_p=0.6, seed=7),
           _normalise({1: math.sqrt(0.4), 3: math.sqrt(0.25), 0: math.sqrt(0.15)}, 6))


def test_min_p_after_top_p():
    # top_p=0.75 keeps 0.4, 0.25, 0.15; min_p=0.3 (p >= 0.12) then keeps all three. In the other order min_p
    # would leave 0.5, 0.3125, 0.1875 and top_p would then keep only two.
    _check(LOGITS, _row(top_p=0.75, min_p=0.3, seed=8), _normalise({1: 0.4, 3: 0.25, 0: 0.15}, 6))
    # top_p=0.9 keeps 0.4, 0.25, 0.15, 0.1 (0.9 reached at the fourth); min_p=0.5 then drops p < 0.2.
    _check(LOGITS, _row(top_p=0.9, min_p=0.5, seed=8), _normalise({1: 0.4, 3: 0.25}, 6))


PEN_LOGITS = [1.0, 0.8, 0.5, 0.2, 0.0, -0.3]


def _penalised_row(temperature: float, **kw) -> SamplingRow:
    row = _row(temperature=temperature, seed=9, **kw)
    row.output_token_ids = [0, 0, 1, 0, 3]  # counts: token 0 three times, tokens 1 and 3 once
    return row


def test_frequency_and_presence_penalties():
    # logit[t] -= 0.3 * count[t] + 0.5 * (count[t] > 0)
    penalised = [1.0 - 0.9 - 0.5, 0.8 - 0.3 - 0.5, 0.5, 0.2 - 0.3 - 0.5, 0.0, -0.3]
    expected = _normalise({t: math.exp(x) for t, x in enumerate(penalised)}, 6)
    _check(PEN_LOGITS, _penalised_row(1.0, frequency_penalty=0.3, presence_penalty=0.5), expected)


def test_greedy_is_the_argmax_after_penalties():
    sampler = Sampler()
    plain = _row(temperature=0)
    assert sampler(torch.tensor([PEN_LOGITS]), [plain]).token_ids == [0]
    penalised = _penalised_row(0, frequency_penalty=0.3, presence_penalty=0.5)
    assert penalised.generator is None
    assert sampler(torch.tensor([PEN_LOGITS]), [penalised]).token_ids == [2]  # 0.5 beats the penalised 1.0, 0.8
    # A negative presence penalty encourages repetition: token 5 goes from -0.3 to 1.7.
    repeat = SamplingRow(SamplingParams(temperature=0, presence_penalty=-2.0), [5], None)
    assert sampler(torch.tensor([PEN_LOGITS]), [repeat]).token_ids == [5]


def _allow(*tokens: int, V: int = 6) -> torch.Tensor:
    """The packed mask allowing `tokens` (bit t % 32 of word t // 32)."""
    words = [0] * ((V + 31) // 32)
    for t in tokens:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor(words, dtype=torch.int64).to(torch.int32)  # bit 31 wraps to the sign, as packed masks do


def test_allowed_tokens_are_respected_even_at_high_temperature():
    row = _row(temperature=5.0, seed=10)
    row.allowed = _allow(2, 5)
    logits = [9.0, 8.0, 0.0, 7.0, 6.0, 0.0]  # the disallowed tokens dominate
    _check(logits, row, _normalise({2: 1.0, 5: 1.0}, 6))
    greedy = SamplingRow(SamplingParams(temperature=0), [], None, _allow(2, 4))
    assert Sampler()(torch.tensor([logits]), [greedy]).token_ids == [4]
    unrestricted = SamplingRow(SamplingParams(temperature=0), [], None, None)
    assert Sampler()(torch.tensor([logits]), [unrestricted]).token_ids == [0]


def test_packed_masks_unpack_to_their_tokens_across_words_and_the_sign_bit():
    V = 70  # three words, the last one partly used
    for allowed in [(0,), (31,), (32, 63), (0, 31, 32, 63, 64, 69), tuple(range(V))]:
        got = unpack_bitmask(_allow(*allowed, V=V)[None], V)[0]
        assert got.nonzero().flatten().tolist() == list(allowed)


def test_logit_bias_adds_to_the_logits_before_everything_else():
    row = _row(temperature=1.0, seed=4, logit_bias=((0, -1.5), (2, 3.0)))
    biased = [x + {2: 3.0, 0: -1.5}.get(t, 0.0) for t, x in enumerate(LOGITS)]
    expected = [math.exp(x) for x in biased]
    _check(LOGITS, row, [e / sum(expected) for e in expected])
    greedy = SamplingRow(SamplingParams(temperature=0, logit_bias=((5, 100.0),)), [], None)
    assert Sampler()(torch.tensor([LOGITS]), [greedy]).token_ids == [5]
    assert Sampler()(torch.tensor([LOGITS]), [_row(temperature=0)]).token_ids == [1]


@pytest.mark.parametrize("temperature", [1e-50, 1e-6])
def test_a_vanishing_temperature_samples_greedily_instead_of_overflowing(temperature):
    row = SamplingRow(SamplingParams(temperature=temperature, seed=1), [], make_generator(1))
    assert row.params.greedy
    assert Sampler()(torch.tensor([LOGITS]), [row]).token_ids == [1]


def test_banned_tokens_are_never_drawn_and_the_rest_renormalise():
    """min_tokens: tokens that would end the output yet (EOS, stop_token_ids) are masked for their row alone."""
    row = _row(temperature=1.0, seed=6)
    row.banned = (1, 3)
    _check(LOGITS, row, _normalise({t: p for t, p in enumerate(P) if t not in (1, 3)}, 6))
    greedy = SamplingRow(SamplingParams(temperature=0), [], None, banned=(1,))
    free = SamplingRow(SamplingParams(temperature=0), [], None)
    assert Sampler()(torch.tensor([LOGITS] * 2), [greedy, free]).token_ids == [3, 1]


def test_a_grammar_that_allows_only_banned_tokens_wins():
    """The grammar can only end here (it allows EOS alone): the output ends, min_tokens or not; other rows of the
    batch keep their bans."""
    ending = SamplingRow(SamplingParams(temperature=1.0, seed=2), [], make_generator(2), _allow(4), banned=(4,))
    banned = SamplingRow(SamplingParams(temperature=0), [], None, banned=(1, 3))
    out = Sampler()(torch.tensor([LOGITS] * 2), [ending, banned])
    assert out.token_ids == [4, 0]


def test_a_mask_allowing_nothing_is_an_error():
    with pytest.raises(ValueError, match="allows no token"):
        Sampler()(torch.tensor([LOGITS]), [SamplingRow(SamplingParams(), [], make_generator(0), _allow())])


def test_unseeded_rows_share_one_draw_with_the_right_distribution():
    """Rows without a generator of their own draw from the sampler's: the frequencies are still the softmax's,
    next to seeded rows too, and two samplers (two processes) do not repeat each other."""
    unseeded = SamplingRow(SamplingParams(temperature=1.0), [], None)
    _check(LOGITS, unseeded, P)
    mixed = [unseeded, _row(temperature=1.0, seed=3)] * (DRAWS // 2)  # the seeded rows share one generator
    counts = Counter(Sampler()(torch.tensor([LOGITS] * DRAWS), mixed).token_ids)
    for t, p in enumerate(P):
        assert abs(counts[t] / DRAWS - p) < TOL, (t, counts[t] / DRAWS, p)
    many = torch.tensor([LOGITS] * 64)
    assert Sampler()(many, [unseeded] * 64).token_ids != Sampler()(many, [unseeded] * 64).token_ids


V = 32768
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=0.5, seed=1234)


def _others() -> list[SamplingParams]:
    """15 rows with other parameters, some seeded (one with the same seed), some greedy."""
    return [
        SamplingParams(temperature=0), SamplingParams(temperature=1.3, seed=7), SamplingParams(top_k=5),
        SamplingParams(top_p=0.5, seed=8), SamplingParams(min_p=0.2), SamplingParams(temperature=0.2, top_k=50),
        SamplingParams(presence_penalty=1.5, logprobs=True, top_logprobs=3), SamplingParams(temperature=0),
        SamplingParams(temperature=2.0, top_p=0.99), SamplingParams(frequency_penalty=-1.0, seed=9),
        SamplingParams(top_k=1), SamplingParams(temperature=1.0, seed=1234), SamplingParams(min_p=0.05, top_k=1000),
        SamplingParams(temperature=0, presence_penalty=2.0), SamplingParams(temperature=0.7, logprobs=True),
    ]


def _generate(params: SamplingParams, batched: bool, steps: int = 20) -> list[int]:
    """The row's tokens over `steps` steps, alone or at a shifting place among 15 other rows (same logits)."""
    logits_gen = torch.Generator().manual_seed(0)
    rows = [SamplingRow(params, [], make_generator(params.seed))]
    if batched:
        rows += [SamplingRow(p, [], None if p.greedy else make_generator(p.seed),
                             _allow(*range(0, V, 3), V=V) if i % 4 == 0 else None) for i, p in enumerate(_others())]
    sampler = Sampler()
    for step in range(steps):
        logits = torch.randn(16, V, generator=logits_gen) * 3  # [16, V]; row 0 is the seeded row's
        order = [(step * 5 + j) % len(rows) for j in range(len(rows))]
        out = sampler(logits[order], [rows[j] for j in order])
        for j, t in zip(order, out.token_ids):
            rows[j].output_token_ids.append(t)
    return rows[0].output_token_ids


def test_seeded_row_is_reproducible_alone_and_in_a_batch():
    alone = _generate(SEEDED, batched=False)
    assert alone == _generate(SEEDED, batched=False)
    assert _generate(SEEDED, batched=True) == alone
    assert len(set(alone)) > 10  # a real sample, not a constant


def test_different_seeds_differ():
    a = _generate(SEEDED, batched=False)
    b = _generate(SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=0.5, seed=4321), batched=False)
    assert a != b
    draws = [torch.empty(8).exponential_(generator=make_generator(None)) for _ in range(2)]
    assert not torch.equal(*draws)  # no seed: a fresh random one each time


def test_logprobs_are_those_of_the_raw_logits():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=gen) * 2
    rows = [
        SamplingRow(SamplingParams(logprobs=True, top_logprobs=5, temperature=0.3, presence_penalty=2.0, seed=1),
                    [3, 4], make_generator(1)),
        SamplingRow(SamplingParams(logprobs=False), [], make_generator(2)),
        SamplingRow(SamplingParams(logprobs=True, top_logprobs=0, temperature=0), [], None),
        SamplingRow(SamplingParams(logprobs=True, top_logprobs=20, top_k=3, seed=3), [], make_generator(3),
                    _allow(7, 8, 9, V=50)),
    ]
    out = Sampler()(logits, rows)
    assert out.logprobs[1] is None
    for i in (0, 2, 3):
        raw = logits[i].tolist()
        lse = max(raw) + math.log(sum(math.exp(x - max(raw)) for x in raw))
        lp = out.logprobs[i]
        assert lp.logprob == pytest.approx(raw[out.token_ids[i]] - lse, abs=1e-5)
        n = rows[i].params.top_logprobs
        assert len(lp.top) == n
        expected = sorted(((t, x - lse) for t, x in enumerate(raw)), key=lambda e: -e[1])[:n]
        assert [t for t, _ in lp.top] == [t for t, _ in expected]
        assert [x for _, x in lp.top] == pytest.approx([x for _, x in expected], abs=1e-5)
    assert out.token_ids[3] in (7, 8, 9)
