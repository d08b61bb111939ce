"""The command line: make-checkpoint and generate, as a person runs them."""

import json
import subprocess
import sys

import pytest

from cluster.cli import main, parse_size
from cluster.config import ModelConfig
from cluster.generate import greedy_generate
from cluster.model.loader import load_model
from cluster.tokenizer import load_tokenizer


def test_make_checkpoint_writes_the_hf_layout(tmp_path, capsys):
    assert main(["make-checkpoint", str(tmp_path / "ck"), "--preset", "tiny", "--seed", "3",
                 "--shard-size", "1MB"]) == 0
    assert "wrote the tiny checkpoint" in capsys.readouterr().out
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["moe_cluster"]["tokenizer"] == "v3"
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in index["weight_map"]


def test_generate_prints_the_greedy_continuation(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Bonjour à tous", "--max-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    tok = load_tokenizer("v3")
    prompt = tok.encode_chat([{"role": "user", "content": "Bonjour à tous"}])
    tokens = list(greedy_generate(load_model(tiny_dir).model, prompt, 12, {tok.eos_id}))
    assert out == tok.decode(tokens) + "\n"
    assert f"{len(prompt)} prompt tokens, {len(tokens)} generated" in err


def test_generate_beyond_the_context_is_a_clear_error(tiny_dir, capsys):
    context = ModelConfig.from_file(tiny_dir).max_position_embeddings
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", str(context)]) == 2
    assert f"exceeds the model's context of {context} tokens" in capsys.readouterr().err


def test_missing_model_directory(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    assert "error: no config.json" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "make-checkpoint", str(tmp_path / "ck")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ck" / "model.safetensors").is_file()


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1000", 1000), ("1.5kb", 1500)])
def test_parse_size(text, size):
    assert parse_size(text) == size
