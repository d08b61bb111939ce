"""Checkpoint loading: expert subsets, sharding, dtypes, progress, and every error path."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.checkpoint.names import expert_tensor, expert_tensor_shapes
from cluster.checkpoint.presets import preset
from cluster.checkpoint.reader import INDEX_FILE, CheckpointError, CheckpointReader
from cluster.checkpoint.writer import write_random_checkpoint
from cluster.config import ConfigError, ModelConfig
from cluster.dtype import parse_dtype
from cluster.model.loader import load_experts, load_model
from cluster.moe.torch_backend import TorchMoEBackend

TINY = preset("tiny")


def _expert_bytes(config: ModelConfig, experts: list[int], itemsize: int = 2) -> int:
    return config.num_layers * len(experts) * 3 * config.hidden_size * config.intermediate_size * itemsize


def test_expert_subset_loads_only_its_tensors(tiny_dir):
    reader = CheckpointReader(tiny_dir)
    subset = [1, 4, 6]
    layers = load_experts(reader, TINY, torch.float32, experts=subset)
    assert reader.bytes_loaded == _expert_bytes(TINY, subset)  # bf16 on disk
    assert [w.expert_ids for w in layers] == [tuple(subset)] * TINY.num_layers
    raw = load_file(str(tiny_dir / "model.safetensors"))
    layer0 = layers[0]
    for local, e in enumerate(subset):
        w1 = raw[expert_tensor(0, e, "w1")].float()
        assert torch.equal(layer0.w13[local, :TINY.intermediate_size], w1)
        assert torch.equal(layer0.w2[local], raw[expert_tensor(0, e, "w2")].float())


def test_expert_subset_gives_the_same_expert_outputs(tiny_dir):
    all_layers = load_experts(CheckpointReader(tiny_dir), TINY, torch.float32)
    subset = load_experts(CheckpointReader(tiny_dir), TINY, torch.float32, experts=[2, 5])
    x = torch.randn(9, TINY.hidden_size)
    ids = torch.tensor([[2, 5]] * 9)
    weights = torch.softmax(torch.randn(9, 2), -1)
    backend = TorchMoEBackend()
    full = backend(x, backend.prepare(all_layers[1]), ids, weights, TINY.num_experts)
    part = backend(x, backend.prepare(subset[1]), ids, weights, TINY.num_experts)
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-6)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tiny_dir):
    sharded = write_random_checkpoint(tmp_path / "sharded", TINY, seed=0, max_shard_bytes=1_000_000)
    index = json.loads((sharded / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    a, b = load_model(sharded, "fp32"), load_model(tiny_dir, "fp32")
    assert a.bytes_loaded == b.bytes_loaded
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), name


def test_writer_is_deterministic_from_the_seed(tmp_path, tiny_dir):
    again = write_random_checkpoint(tmp_path / "again", TINY, seed=0)
    other = write_random_checkpoint(tmp_path / "other", TINY, seed=1)
    assert (again / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert ModelConfig.from_file(again) == TINY


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_cast_to_the_chosen_dtype(tiny_dir, dtype):
    lm = load_model(tiny_dir, dtype)
    want = parse_dtype(dtype)
    assert {p.dtype for p in lm.model.parameters()} == {want}
    assert lm.model.model.layers[0].block_sparse_moe.executor.layers[0].w13.dtype == want


def test_progress_reports_every_byte(tiny_dir):
    seen: list[tuple[int, int]] = []
    reader = CheckpointReader(tiny_dir)
    load_experts(reader, TINY, torch.float32, progress=lambda done, total: seen.append((done, total)))
    total = _expert_bytes(TINY, list(range(8)))
    assert seen[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "ck")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight is missing"):
        load_model(d)


def test_misshaped_tensor_names_both_shapes(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "ck")
    tensors = load_file(str(d / "model.safetensors"))
    name = expert_tensor(0, 3, "w2")
    tensors[name] = tensors[name][:, :100].contiguous()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[64, 100\].*expected \[64, 128\]"):
        load_model(d)


def test_index_naming_a_missing_shard(tmp_path):
    d = write_random_checkpoint(tmp_path / "ck", TINY, max_shard_bytes=1_000_000)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard.name}"):
        CheckpointReader(d)


def test_index_listing_a_tensor_its_shard_lacks(tmp_path):
    d = write_random_checkpoint(tmp_path / "ck", TINY, max_shard_bytes=1_000_000)
    index = json.loads((d / INDEX_FILE).read_text())
    name = expert_tensor(1, 7, "w3")
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{name} is missing from {wrong}"):
        load_model(d)


def test_corrupt_index(tmp_path):
    d = write_random_checkpoint(tmp_path / "ck", TINY, max_shard_bytes=1_000_000)
    (d / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        CheckpointReader(d)


def test_corrupt_safetensors_file(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "ck")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        CheckpointReader(d)


def test_directory_without_weights(tmp_path, tiny_dir):
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(d)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nowhere")


def test_missing_or_broken_config(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "ck")
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(d)
    (d / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(d)


def test_unknown_dtype_and_bad_expert_ids(tiny_dir):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model(tiny_dir, "int8")
    with pytest.raises(CheckpointError, match=r"expert ids \[8\] are out of range"):
        load_experts(CheckpointReader(tiny_dir), TINY, torch.float32, experts=[0, 8])


def test_stored_bytes_come_from_headers(tiny_dir):
    reader = CheckpointReader(tiny_dir)
    assert reader.stored_nbytes(expert_tensor_shapes(TINY, [0])) == _expert_bytes(TINY, [0])
    assert reader.bytes_loaded == 0
