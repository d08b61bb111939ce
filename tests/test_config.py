"""config.json parsing: the three released shapes, both rope spellings, and errors that name the field."""

import json
import re
from pathlib import Path

import pytest

from cluster.checkpoint.presets import PRESETS
from cluster.config import ConfigError, ModelConfig
from cluster.tokenizer import resolve_tokenizer_version

CONFIGS = Path(__file__).parent / "data" / "configs"


def _load(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


@pytest.mark.parametrize("name, hidden, ffn, layers, heads, kv, experts, vocab, context, tokenizer", [
    ("mixtral-8x22b-instruct", 6144, 16384, 56, 48, 8, 8, 32768, 65536, "v3"),
    ("mixtral-8x7b-instruct", 4096, 14336, 32, 32, 8, 8, 32000, 32768, "v1"),
    ("mistral-7b-instruct-v0.2", 4096, 14336, 32, 32, 8, 0, 32000, 32768, "v1"),
])
def test_released_configs(name, hidden, ffn, layers, heads, kv, experts, vocab, context, tokenizer):
    c = ModelConfig.from_file(CONFIGS / name)
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads) == (hidden, ffn, layers,
                                                                                                 heads, kv)
    assert (c.num_experts, c.vocab_size, c.max_position_embeddings) == (experts, vocab, context)
    assert c.head_dim == 128 and c.rope_theta == 1e6
    assert c.experts_per_token == (2 if experts else 0)
    assert resolve_tokenizer_version(c) == tokenizer


def test_rope_parameters_of_transformers_5():
    d = _load("mixtral-8x7b-instruct")
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_theta": 250000.0, "rope_type": "default"}
    assert ModelConfig.from_hf_dict(d).rope_theta == 250000.0


def test_round_trip_through_hf_dict():
    for c in PRESETS.values():
        assert ModelConfig.from_hf_dict(json.loads(json.dumps(c.to_hf_dict()))) == c


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("hidden_size"), "missing required field 'hidden_size'"),
    (lambda d: d.update(num_hidden_layers="32"), "num_hidden_layers must be an integer"),
    (lambda d: d.update(num_key_value_heads=5), "not a multiple of num_key_value_heads 5"),
    (lambda d: d.update(num_experts_per_tok=9), "num_experts_per_tok 9 must be in 1..num_local_experts 8"),
    (lambda d: d.update(intermediate_size=0), "intermediate_size must be positive"),
    (lambda d: d.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (lambda d: d.update(sliding_window=4096), "sliding_window 4096 is not supported"),
    (lambda d: d.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda d: d.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "rope_type 'yarn'"),
    (lambda d: d.update(rope_theta=True), "rope_theta must be a number"),
    (lambda d: d.update(moe_cluster={"tokenizer": "v9"}), "moe_cluster.tokenizer 'v9'"),
    (lambda d: d.update(hidden_size=4100), "hidden_size 4100 is not divisible by num_attention_heads 32"),
])
def test_errors_name_the_field(change, message):
    d = _load("mixtral-8x7b-instruct")
    change(d)
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_hf_dict(d)
