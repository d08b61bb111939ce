"""The scheduler's budgets: a step's cost, attention included, and what a long prompt may add beside decodes."""

from __future__ import annotations

import pytest

from cluster.checkpoint.presets import preset
from cluster.engine.block_manager import BlockManager
from cluster.engine.cost_probe import MAX_FACTOR
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from cluster.engine.sequence import Sequence, Status
from cluster.engine.step_cost import StepCost

COST = StepCost(1000.0)  # a token after 1,000 cached ones costs 2


def _seq(seq_id: int, prompt_len: int) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, [7] * prompt_len, SamplingParams())


def _advance(out: SchedulerOutput) -> None:
    """What the engine does after a step: computed tokens land, and each caught-up sequence samples one token."""
    for s in out.scheduled:
        s.seq.num_computed += s.num_new
        if s.seq.num_computed == s.seq.num_tokens:
            s.seq.output.append(3)


def _scheduler(beside: int | None, max_tokens: int = 512, blocks: int = 4096) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_tokens,
                             prefill_budget_beside_decodes=beside, cost=COST)
    return Scheduler(config, BlockManager(num_blocks=blocks, block_size=16, enable_prefix_caching=False))


def test_the_model_cost_counts_attention_flops_against_weight_flops():
    mini = preset("mini")  # hidden 512, intermediate 1024, 8 heads of 64, 2 kv heads, top-2 of 8 experts
    weights = 2 * (512 * (512 + 2 * 128) + 512 * 512 + 2 * 3 * 512 * 1024 + 512 * 8)
    assert StepCost.for_model(mini).break_even == weights / (4 * 8 * 64)


@pytest.mark.parametrize("context", [0, 1, 999, 1000, 5000, 30_000])
@pytest.mark.parametrize("budget", [0, 1, 7, 128, 1024])
def test_a_chunk_is_the_longest_that_fits_its_budget(context, budget):
    n = COST.chunk_within(context, budget)
    assert COST.of_chunk(context, n) <= budget < COST.of_chunk(context, n + 1)


def test_a_long_prompt_beside_decodes_advances_within_the_budget_and_never_skips_a_decode():
    scheduler = _scheduler(beside=64)
    decoders = [_seq(i, 20) for i in range(4)]
    for seq in decoders:
        scheduler.add(seq)
    _advance(scheduler.schedule())  # their prompts, in one step
    long = _seq(9, 6000)
    scheduler.add(long)
    chunks: list[tuple[int, int]] = []  # (context before, tokens)
    while long.num_computed < len(long.prompt):
        out = scheduler.schedule()
        by_seq = {s.seq.seq_id: s.num_new for s in out.scheduled}
        assert [by_seq.get(seq.seq_id) for seq in decoders] == [1, 1, 1, 1]
        chunks.append((long.num_computed, by_seq[9]))
        _advance(out)
    assert sum(n for _, n in chunks) == 6000
    assert chunks[0] == (0, 64) and chunks[-1][1] <= 64 // 6  # a token ~6K tokens in costs ~7
    assert all(COST.of_chunk(c, n) <= 64 for c, n in chunks)


def test_without_decodes_a_prefill_takes_the_whole_step_budget_weighted_by_its_context():
    scheduler = _scheduler(beside=64)
    long = _seq(0, 6000)
    scheduler.add(long)
    chunks = []
    while long.num_computed < len(long.prompt):
        out = scheduler.schedule()
        chunks.append((long.num_computed, out.scheduled[0].num_new))
        _advance(out)
    assert chunks[0] == (0, 512)
    assert chunks[1] == (512, COST.chunk_within(512, 512)) == (512, 338)
    assert all(COST.of_chunk(c, n) <= 512 for c, n in chunks)


def test_the_default_budget_counts_tokens_only():
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256)
    scheduler = Scheduler(config, BlockManager(num_blocks=4096, block_size=16, enable_prefix_caching=False))
    long = _seq(0, 1000)
    scheduler.add(long)
    sizes = []
    while long.num_computed < len(long.prompt):
        out = scheduler.schedule()
        sizes.append(out.scheduled[0].num_new)
        _advance(out)
    assert sizes == [256, 256, 256, 232]


def test_a_first_chunk_advances_by_one_token_when_even_one_costs_more_than_the_budget():
    scheduler = _scheduler(beside=1)
    decoder = _seq(0, 4)
    scheduler.add(decoder)
    _advance(scheduler.schedule())
    long = _seq(1, 3000)
    long.num_computed = 0
    scheduler.add(long)
    _advance(scheduler.schedule())  # 1 token at context 0 costs exactly 1
    out = scheduler.schedule()  # at context 1 a token costs 1.001: over the budget, but the chunk still moves
    assert [(s.seq.seq_id, s.num_new) for s in out.scheduled] == [(0, 1), (1, 1)]


def test_beside_decodes_a_long_prompt_is_capped_and_a_short_one_taken_whole():
    scheduler = _scheduler(beside=32)
    first, long = _seq(0, 500), _seq(1, 5000)
    scheduler.add(first)
    scheduler.add(long)
    out = scheduler.schedule()  # no decodes yet: 512 tokens, 500 to the first, 12 to the long one
    assert [(s.seq.seq_id, s.num_new) for s in out.scheduled] == [(0, 500), (1, 12)]
    _advance(out)
    short = _seq(2, 400)
    scheduler.add(short)
    out = scheduler.schedule()  # `first` decodes: the long prompt gets 32 units, the short one all it needs
    assert [(s.seq.seq_id, s.num_new) for s in out.scheduled] == [(0, 1), (1, 31), (2, 400)]


def test_a_prefill_left_out_of_a_step_does_not_hold_back_the_decodes_behind_it():
    scheduler = _scheduler(beside=32)
    first, second, decoder = _seq(0, 3000), _seq(1, 3000), _seq(2, 10)
    decoder.output.append(3)  # 11 tokens, 10 computed: decoding
    for seq, computed in ((first, 1000), (second, 1000), (decoder, 10)):
        scheduler.blocks.allocate(seq, computed)
        seq.num_computed = computed
        scheduler.add(seq)
        scheduler.running.append(scheduler.waiting.popleft())
        seq.status = Status.RUNNING
    out = scheduler.schedule()  # a token after 1,000 cached costs 2: `first` takes 16 and the 32 units
    assert [(s.seq.seq_id, s.num_new) for s in out.scheduled] == [(0, 16), (2, 1)]


# -- the measured price ---------------------------------------------------------------------------------------------
def test_a_measured_price_stays_near_the_flops_one_and_the_probe_leaves_nothing_behind(make_engine, model):
    flops = StepCost.for_model(model.config).break_even
    measured_engine = make_engine(blocks=512, step_cost="measured")  # room for a probe 3,968 tokens in
    measured = measured_engine.scheduler.config.cost.break_even
    assert flops / MAX_FACTOR <= measured <= flops * MAX_FACTOR
    # The probe's made-up KV sits in blocks requests will use: what they generate is unchanged.
    prompts = {f"r{i}": ([5 + i] * (40 + 30 * i), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
               for i in range(3)}
    assert _generate(measured_engine, prompts) == _generate(make_engine(blocks=512), prompts)


def _generate(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert all(len(t) == 8 for t in tokens.values()), tokens
    return tokens


def test_a_cache_too_small_to_probe_keeps_the_flops_price(make_engine, model):
    engine = make_engine(blocks=64, step_cost="measured")  # 1,024 tokens: under 16 chunks of context
    assert engine.scheduler.config.cost == StepCost.for_model(model.config)


def test_an_unknown_price_is_refused(make_engine):
    with pytest.raises(ValueError, match="unknown step_cost 'fast'"):
        make_engine(step_cost="fast")


@pytest.mark.parametrize(("device", "expected"), [("cpu", "measured"), ("cuda", "flops")])
def test_serving_measures_the_price_on_a_cpu_and_counts_flops_on_a_gpu(tiny_dir, device, expected):
    from cluster.serve.args import ServeArgs
    from cluster.serve.resolved import resolve

    assert resolve(ServeArgs(model=str(tiny_dir), device=device)).engine.step_cost == expected
    assert resolve(ServeArgs(model=str(tiny_dir), device=device, step_cost="flops")).engine.step_cost == "flops"
