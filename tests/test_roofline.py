"""The roofline meter (benchmarks/roofline.py): a step's bytes and FLOPs from its shapes and routing, and the
records it keeps of a real engine's steps."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cluster.checkpoint.presets import preset
from cluster.engine.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("roofline", ROOT / "benchmarks" / "roofline.py")
roofline = importlib.util.module_from_spec(_spec)
sys.modules["roofline"] = roofline  # its dataclasses look their module up there
_spec.loader.exec_module(roofline)

TINY = preset("tiny")  # hidden 64, ffn 128, 2 layers, 4 heads of 16, 2 kv heads, 8 experts top-2, vocab 32768


def test_a_decode_steps_bytes_and_flops_counted_by_hand():
    shapes = [(10, 1, True), (20, 1, True)]
    traffic = roofline.step_traffic(TINY, 4, 4, shapes, touched=[3, 2])
    dense = 64 * (64 + 2 * 32) + 64 * 64 + 64 * 8 + 2 * 64  # q, k, v, o; router; two norms: one layer
    weights = 2 * dense + 5 * (3 * 64 * 128) + 64  # 5 experts touched over both layers; the final norm
    lm_head, embeddings = 32768 * 64, 2 * 64
    kv = (11 + 21) * (2 * 2 * 32) + 2 * (2 * 2 * 32)  # read every context, write the new tokens
    assert traffic.bytes == 4 * (weights + lm_head + embeddings + kv)
    per_token = 2 * (64 * 128 + 64 * 64 + 2 * 3 * 64 * 128 + 64 * 8)  # both layers' weights, top-2 experts
    attention = (11 + 21) * 4 * 4 * 16  # keys per token (its own too) x QK and PV over 4 heads of 16
    assert traffic.flops == 2 * 2 * per_token + 2 * attention + 2 * 2 * 32768 * 64


def test_only_the_touched_experts_are_read_and_a_step_that_samples_nothing_skips_the_lm_head():
    chunk = [(0, 8, False)]
    few = roofline.step_traffic(TINY, 2, 2, chunk, touched=[1, 1])
    many = roofline.step_traffic(TINY, 2, 2, chunk, touched=[8, 8])
    assert many.bytes - few.bytes == 2 * 14 * 3 * 64 * 128
    sampled = roofline.step_traffic(TINY, 2, 2, [(0, 8, True)], touched=[1, 1])
    assert sampled.bytes - few.bytes == 2 * 32768 * 64


def test_fp8_experts_are_read_as_a_byte_a_weight_and_their_scales():
    chunk = [(0, 8, False)]
    bf16 = roofline.step_traffic(TINY, 2, 2, chunk, touched=[3, 2])
    fp8 = roofline.step_traffic(TINY, 2, 2, chunk, touched=[3, 2], quantization="fp8")
    one_expert = 3 * 64 * 128  # weights of one expert of one layer
    assert bf16.bytes - fp8.bytes == 5 * (one_expert - 4 * (2 * 128 + 64))  # 5 touched, scales of w1, w3, w2
    assert fp8.flops == bf16.flops


@pytest.mark.parametrize(("shapes", "expected"), [
    ([(10, 1, True)] * 5, ("decode", 8)),
    ([(10, 1, True), (0, 30, True)], ("mixed", 32)),
    ([(0, 17, True)], ("prefill", 32)),
    ([(0, 1, True)], ("prefill", 1)),  # a one-token prompt is no decode
])
def test_steps_are_grouped_by_kind_and_a_power_of_two_bucket(shapes, expected):
    assert roofline.step_kind(shapes) == expected


def test_t_roof_is_the_slower_of_reading_and_computing():
    traffic = roofline.StepTraffic(bytes=1000, flops=10_000)
    assert traffic.t_roof(read_bytes_per_s=100, flops_per_s=10_000) == 10.0
    assert traffic.t_roof(read_bytes_per_s=10_000, flops_per_s=100) == 100.0


def test_the_meter_records_every_step_of_a_real_engine(make_engine):
    engine = make_engine()
    meter = roofline.RooflineMeter(engine)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    for i, length in enumerate((12, 40)):
        engine.add_request(f"r{i}", [7 + i] * length, params)
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    meter.close()
    assert engine.runner.run == meter._run  # the runner is given back
    records = meter.records()
    assert len(records) == steps and records[0].kind == "prefill" and records[-1].kind == "decode"
    assert sum(r.tokens for r in records) == 12 + 40 + 2 * 4  # prompts, then each choice's 4 later tokens
    assert all(0 < r.device_s <= r.wall_s for r in records)
    first = roofline.step_traffic(TINY, 4, 4, [(0, 12, True), (0, 40, True)], [8, 8])
    assert records[0].traffic.bytes <= first.bytes  # at most every expert of both layers was read
    rows = roofline.roofline_table(records, read_bytes_per_s=1e9, flops_per_s=1e12)
    assert rows[-1]["kind"] == "all" and rows[-1]["steps"] == steps
    assert sum(r["steps"] for r in rows[:-1]) == steps
