"""Random weights made where they are used (`--load-format random`): seeded per tensor name, so every process makes
the same values and a shard makes only its own experts; named shapes stand for config-only directories."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cluster.checkpoint.names import dense_tensor_shapes, expert_tensor_shapes
from cluster.checkpoint.presets import preset
from cluster.checkpoint.random_weights import RandomWeights
from cluster.checkpoint.weights import model_directory, open_weights, shape_directory
from cluster.cli import main
from cluster.config import ModelConfig
from cluster.generate import greedy_generate
from cluster.model.loader import load_model
from cluster.parallel.shard_worker import ShardWorker
from cluster.tokenizer import load_tokenizer

CONFIGS = Path(__file__).parent / "data" / "configs"
TINY = preset("tiny")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CLUSTER_CACHE", str(tmp_path / "cache"))


def test_a_tensor_depends_on_its_name_and_the_seed_only():
    shapes = expert_tensor_shapes(TINY, list(range(TINY.num_experts)))
    one = {name: shape for name, shape in shapes.items() if ".experts.3." in name}
    everything = RandomWeights(0).load(shapes, torch.float32)
    alone = RandomWeights(0).load(one, torch.float32)
    assert alone.keys() == one.keys() and len(one) == 3 * TINY.num_layers
    assert all(torch.equal(alone[name], everything[name]) for name in one)
    other_seed = RandomWeights(1).load(one, torch.float32)
    assert not any(torch.equal(other_seed[name], alone[name]) for name in one)


def test_the_scales_are_the_embedded_checkpoints():
    made = RandomWeights(0).load(dense_tensor_shapes(preset("mini")), torch.float32)
    norm = made["model.norm.weight"]
    assert abs(norm.mean().item() - 1.0) < 0.02 and abs(norm.std().item() - 0.1) < 0.01
    assert abs(made["model.embed_tokens.weight"].std().item() - 1.0) < 0.01
    q = made["model.layers.0.self_attn.q_proj.weight"]  # [H*Dh, D]: N(0, 1/D)
    assert abs(q.std().item() * q.shape[-1] ** 0.5 - 1.0) < 0.01


def test_the_dtype_asked_for_is_made_and_counted():
    source = RandomWeights(0)
    made = source.load({"model.norm.weight": (64,)}, torch.bfloat16)
    assert made["model.norm.weight"].dtype == torch.bfloat16 and source.bytes_loaded == 128


@pytest.mark.parametrize(("name", "released"), [("mixtral-8x7b", "mixtral-8x7b-instruct"),
                                                ("mixtral-8x22b", "mixtral-8x22b-instruct")])
def test_a_shape_name_stands_for_the_released_models_config(name, released):
    directory = model_directory(name, "random")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json"]
    shape = ModelConfig.from_file(directory)
    expected = {"mixtral-8x7b": "v1", "mixtral-8x22b": "v3"}[name]  # what the vocabulary size implies
    assert shape == dataclasses.replace(ModelConfig.from_file(CONFIGS / released), tokenizer_version=expected)
    assert model_directory(name, "random") == directory  # made once, then reused


def test_a_shape_of_a_callers_own_holds_its_config_under_a_plain_name_only():
    shallow = dataclasses.replace(preset("mixtral-8x7b"), num_layers=3)
    directory = shape_directory("mixtral-8x7b-3layers", shallow)
    assert ModelConfig.from_file(directory) == shallow and directory.name == "mixtral-8x7b-3layers"
    for name in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="not a shape name"):
            shape_directory(name, shallow)


def test_a_shape_name_is_not_a_checkpoint():
    assert model_directory("mixtral-8x7b", "safetensors") == Path("mixtral-8x7b")  # the loader says it is missing
    with pytest.raises(ValueError, match="unknown load format 'dummy'"):
        open_weights("anywhere", "dummy")


def test_an_expert_shard_makes_exactly_the_single_process_experts():
    directory = model_directory("tiny", "random")
    whole = load_model(directory, load_format="random").model.moe_layers()[0].executor.layers
    shard = ShardWorker.load(directory, TINY, (2, 5), torch.float32, "cpu", load_format="random").layers
    assert len(shard) == len(whole) == TINY.num_layers
    for mine, everyone in zip(shard, whole):
        assert mine.expert_ids == (2, 5)
        assert torch.equal(mine.w13, everyone.w13[[2, 5]]) and torch.equal(mine.w2, everyone.w2[[2, 5]])


def test_generate_serves_a_shape_with_no_checkpoint(capsys):
    assert main(["generate", "--model", "tiny", "--load-format", "random", "--prompt", "hi", "--max-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    tok = load_tokenizer("v3")
    prompt = tok.encode_chat([{"role": "user", "content": "hi"}])
    model = load_model(model_directory("tiny", "random"), load_format="random").model
    tokens = list(greedy_generate(model, prompt, 6, {tok.eos_id}))
    assert out == tok.decode(tokens) + "\n"
    assert "made" in err and f"{len(prompt)} prompt tokens, {len(tokens)} generated" in err
