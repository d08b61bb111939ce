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


@pytest.mark.e2e  # a CLI process
def test_console_script_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "make-checkpoint", str(tmp_path / "ck")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ck" / "model.safetensors").is_file()


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1000", 1000), ("1.5kb", 1500)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_serve_has_one_option_per_serve_arg_and_leaves_the_defaults_to_it(tmp_path, monkeypatch):
    import cluster.serve.resolved as resolved
    import cluster.serve.standalone as standalone
    from cluster.cli import build_parser
    from cluster.serve.args import ServeArgs

    serve = build_parser(["serve"])._subparsers._group_actions[0].choices["serve"]
    dests = {a.dest for a in serve._actions} - {"help", "host", "port", "no_ray"}
    assert dests == set(ServeArgs.model_fields)
    started = []
    monkeypatch.setattr(standalone, "run_standalone", lambda resolved, host, port: started.append(resolved))
    monkeypatch.setattr(resolved, "resolve", lambda args: args)  # what the CLI hands over, unresolved
    assert main(["serve", "--no-ray", "--model", str(tmp_path), "--max-num-seqs", "3", "--kv-cache-bytes", "2MiB",
                 "--dtype", "fp32", "--shard-threads", "2"]) == 0
    assert started == [ServeArgs(model=str(tmp_path), max_num_seqs=3, kv_cache_bytes=2 * 2**20, dtype="fp32",
                                 shard_threads=2)]
    assert main(["serve", "--no-ray", "--max-num-seqs", "0"]) == 2  # ServeArgs' own checks apply


# Starts `moe-cluster serve --no-ray` with uvicorn's server replaced by one chat request through the app, and counts every
# open() of a config.json (Python's audit hook sees each, whichever module does it).
_COUNT_CONFIG_READS = """
import sys
import uvicorn
from starlette.testclient import TestClient

reads = []
sys.addaudithook(lambda event, args: event == "open" and str(args[0]).endswith("config.json") and reads.append(args[0]))

def one_request(server, sockets=None):
    with TestClient(server.config.app) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2})
        assert r.status_code == 200, r.text

uvicorn.Server.run = one_request
from cluster.cli import main
assert main(["serve", "--no-ray", "--model", sys.argv[1], "--shards", "2", "--kv-cache-bytes", "16MiB"]) == 0
print(len(reads))
"""


@pytest.mark.e2e  # a `moe-cluster serve` process
def test_a_no_ray_serve_start_reads_config_json_once(tiny_dir):
    result = subprocess.run([sys.executable, "-c", _COUNT_CONFIG_READS, str(tiny_dir)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "1", result.stdout


_IMPORTS_AFTER = """
import sys
from cluster.cli import main
assert main(sys.argv[1:]) == 0
import cluster.serve.args  # the settings model: declarations, read by the CLI and Serve configs alike
print(" ".join(m for m in ("torch", "ray", "starlette", "cluster.engine.engine") if m in sys.modules) or "none")
"""


@pytest.mark.e2e  # another interpreter, so that nothing is imported yet
def test_keys_and_the_settings_model_import_neither_torch_nor_the_serving_stack(tmp_path):
    (tmp_path / "ledger").mkdir(mode=0o700)
    db = tmp_path / "ledger" / "ledger.db"
    result = subprocess.run([sys.executable, "-c", _IMPORTS_AFTER, "keys", "list", "--db", str(db)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "none", result.stdout
