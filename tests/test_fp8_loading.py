"""FP8 experts at load: quantized from a bf16 checkpoint (`--quantization fp8`), read from an FP8 checkpoint in
vLLM's layout (found from its config.json, no flag), made from random weights; each shard its own experts; the
config's quantization_config; and what a wrong checkpoint is refused with."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cluster.checkpoint.names import expert_tensor
from cluster.checkpoint.presets import preset
from cluster.checkpoint.random_weights import RandomWeights
from cluster.checkpoint.reader import CheckpointError, CheckpointReader
from cluster.config import ConfigError, ModelConfig, expert_quantization
from cluster.kernels.fp8 import FP8, dequantize
from cluster.model.loader import load_experts, load_model
from cluster.moe.executor import LocalExpertExecutor
from cluster.moe.torch_backend import TorchMoEBackend
from cluster.parallel.shard_worker import ShardWorker
from tests.conftest import TINY_DENSE
from tests.fp8_checkpoint import write_fp8_checkpoint

TINY = preset("tiny")


def _experts(model) -> list:
    return model.moe_layers()[0].executor.layers


def _logits(model, tokens: list[int]) -> torch.Tensor:
    from cluster.model.kv_cache import ContiguousKVCache

    c = model.config
    cache = ContiguousKVCache(c.num_layers, 1, len(tokens), c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    return model.compute_logits(model(torch.tensor(tokens), cache.begin_step([0], [len(tokens)]), cache))


def test_quantization_fp8_quantizes_a_bf16_checkpoint_as_it_loads(tiny_dir):
    wide, fp8 = load_model(tiny_dir, "fp32"), load_model(tiny_dir, "fp32", quantization="fp8")
    for w, q in zip(_experts(wide.model), _experts(fp8.model)):
        assert q.w13.dtype == q.w2.dtype == FP8 and q.dtype == torch.float32 and q.expert_ids == w.expert_ids
        for full, values, scale in ((w.w13, q.w13, q.scales.w13), (w.w2, q.w2, q.scales.w2)):
            assert torch.equal(scale, full.abs().amax(-1) / 448)  # per output channel, each row's own range
            back = dequantize(values, scale, torch.float64)
            normal = full.abs() >= scale.unsqueeze(-1) * 2**-6  # above the subnormals: 3 mantissa bits
            assert ((back - full.double()).abs() / full.double().abs())[normal].max() <= 2**-4 + 1e-12
        assert q.nbytes == (w.nbytes // 4) + 4 * (q.scales.w13.numel() + q.scales.w2.numel())  # 1 byte, not 4
    wide_state, fp8_state = wide.model.state_dict(), fp8.model.state_dict()
    assert all(torch.equal(wide_state[n], fp8_state[n]) for n in wide_state)  # everything else as it was
    tokens = list(range(100, 140))
    a, b = _logits(wide.model, tokens), _logits(fp8.model, tokens)
    assert ((a - b).norm() / a.norm()).item() < 0.05


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_an_fp8_checkpoint_loads_as_fp8_without_the_flag(tmp_path, tiny_dir, per_channel: bool, static: bool):
    d = write_fp8_checkpoint(tiny_dir, tmp_path / "fp8", per_channel, static)
    config = ModelConfig.from_file(d)
    assert config.quantization == "fp8" and expert_quantization(config, None) == "fp8"
    stored = load_file(str(d / "model.safetensors"))
    reader = CheckpointReader(d)
    loaded = load_model(d, "fp32")
    assert loaded.bytes_loaded == reader.stored_nbytes({n: tuple(t.shape) for n, t in stored.items()
                                                        if not n.endswith("input_scale")})
    f = TINY.intermediate_size
    for i, layer in enumerate(_experts(loaded.model)):
        for local, e in enumerate(layer.expert_ids):
            w1, w3 = expert_tensor(i, e, "w1"), expert_tensor(i, e, "w3")
            assert torch.equal(layer.w13[local, :f].view(torch.uint8), stored[w1].view(torch.uint8))  # as stored
            assert torch.equal(layer.w13[local, f:].view(torch.uint8), stored[w3].view(torch.uint8))
            want = torch.cat([stored[w + "_scale"].reshape(-1).expand(f) for w in (w1, w3)])
            assert torch.equal(layer.scales.w13[local], want)
    attention = loaded.model.model.layers[1].self_attn.q_proj.weight  # stored in FP8: dequantized into fp32
    name = "model.layers.1.self_attn.q_proj.weight"
    scale = stored[name + "_scale"].reshape(-1).expand(attention.shape[0])
    assert attention.dtype == torch.float32
    assert torch.equal(attention, dequantize(stored[name], scale, torch.float32))
    gate = loaded.model.model.layers[1].block_sparse_moe.gate.weight  # kept in bf16 by the checkpoint
    assert torch.equal(gate, stored["model.layers.1.block_sparse_moe.gate.weight"].float())
    tokens = list(range(200, 240))
    a, b = _logits(load_model(tiny_dir, "fp32").model, tokens), _logits(loaded.model, tokens)
    assert ((a - b).norm() / a.norm()).item() < 0.25  # attention in FP8 too (unscaled values would be far off)


def test_each_shard_quantizes_only_its_own_experts(tiny_dir, monkeypatch):
    full = load_model(tiny_dir, "fp32", quantization="fp8")
    read: list[str] = []
    load = CheckpointReader.load

    def counting(self, shapes, *args, **kwargs):
        read.extend(shapes)
        return load(self, shapes, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "load", counting)
    worker = ShardWorker.load(tiny_dir, full.config, (1, 6), torch.float32, "cpu", "torch", quantization="fp8")
    assert {n.split(".experts.")[1].split(".")[0] for n in read} == {"1", "6"}
    for part, whole in zip(worker.layers, _experts(full.model)):
        assert part.expert_ids == (1, 6)
        assert torch.equal(part.w13.view(torch.uint8), whole.w13[[1, 6]].view(torch.uint8))
        assert torch.equal(part.scales.w2, whole.scales.w2[[1, 6]])


def test_random_weights_quantize_as_they_are_made():
    """A shard's experts made from random weights are the same numbers the whole model's quantization gives."""
    whole = load_experts(RandomWeights(0), TINY, torch.bfloat16, quantization="fp8")
    part = load_experts(RandomWeights(0), TINY, torch.bfloat16, experts=[2, 5], quantization="fp8")
    assert part[1].dtype == torch.bfloat16 and part[1].w2.dtype == FP8
    assert torch.equal(part[1].w2.view(torch.uint8), whole[1].w2[[2, 5]].view(torch.uint8))
    assert torch.equal(part[1].scales.w13, whole[1].scales.w13[[2, 5]])


def test_progress_reports_every_byte_across_the_layers(tmp_path, tiny_dir):
    for directory in (tiny_dir, write_fp8_checkpoint(tiny_dir, tmp_path / "fp8")):
        seen: list[tuple[int, int]] = []
        reader = CheckpointReader(directory)
        load_experts(reader, TINY, torch.float32, progress=lambda done, total: seen.append((done, total)),
                     quantization="fp8")
        total = TINY.num_layers * 8 * 3 * TINY.hidden_size * TINY.intermediate_size * (1 if directory != tiny_dir
                                                                                       else 2)
        assert seen[-1] == (total, total), directory
        assert all(a[0] < b[0] and a[1] == total for a, b in zip(seen, seen[1:])), directory


def test_fp8_tensors_are_never_read_as_plain_weights(tmp_path, tiny_dir):
    """A checkpoint holding FP8 tensors whose config.json does not say so: refused, not cast without scales."""
    d = write_fp8_checkpoint(tiny_dir, tmp_path / "fp8")
    config = json.loads((d / "config.json").read_text())
    del config["quantization_config"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"_proj\.weight is stored as F8_E4M3 .*quant_method fp8"):
        load_model(d, "fp32")


def test_a_missing_or_misshaped_weight_scale_is_named(tmp_path, tiny_dir):
    from safetensors.torch import save_file

    d = write_fp8_checkpoint(tiny_dir, tmp_path / "fp8", per_channel=True)
    tensors = load_file(str(d / "model.safetensors"))
    name = expert_tensor(1, 3, "w2") + "_scale"
    tensors[name] = tensors[name][:5]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} has shape \[5, 1\]: expected one scale"):
        load_model(d, "fp32")
    del tensors[name]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} is missing"):
        load_model(d, "fp32")


def test_quantization_config_round_trips_and_refuses_what_it_cannot_read():
    c = ModelConfig(**{**TINY.summary(), "quantization": "fp8"})
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(c.to_hf_dict()))) == c
    base = TINY.to_hf_dict()
    for bad, message in (({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
                         ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
                         ({"quant_method": "fp8", "activation_scheme": "mixed"}, "activation_scheme 'mixed'"),
                         ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2'"),
                         ("fp8", "must be an object")):
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_hf_dict({**base, "quantization_config": bad})


def test_expert_quantization_is_the_flag_else_the_checkpoints():
    fp8_checkpoint = ModelConfig(**{**TINY.summary(), "quantization": "fp8"})
    assert expert_quantization(TINY, None) is None
    assert expert_quantization(TINY, "fp8") == "fp8"
    assert expert_quantization(fp8_checkpoint, None) == "fp8"
    assert expert_quantization(TINY_DENSE, None) is None
    with pytest.raises(ValueError, match="applies to the experts, and this model is dense"):
        expert_quantization(TINY_DENSE, "fp8")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        expert_quantization(TINY, "int4")


def test_serving_resolves_the_quantization_once_and_every_shard_loads_it(tiny_dir, tmp_path):
    from cluster.serve.args import ServeArgs
    from cluster.serve.engine_builder import in_process_executor
    from cluster.serve.resolved import resolve

    assert resolve(ServeArgs(model=str(tiny_dir), device="cpu")).quantization is None
    fp8_dir = write_fp8_checkpoint(tiny_dir, tmp_path / "fp8")
    assert resolve(ServeArgs(model=str(fp8_dir), device="cpu")).quantization == "fp8"
    resolved = resolve(ServeArgs(model=str(tiny_dir), device="cpu", quantization="fp8", shards=2,
                                 moe_backend="torch"))
    assert resolved.quantization == "fp8"
    executor = in_process_executor(resolved)
    workers = executor.transport.workers
    assert [w.expert_ids for w in workers] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert all(layer.w13.dtype == FP8 for w in workers for layer in w.layers)
    whole = LocalExpertExecutor(load_experts(CheckpointReader(tiny_dir), TINY, torch.float32, quantization="fp8"),
                                TINY.num_experts, TorchMoEBackend())
    g = torch.Generator().manual_seed(0)
    x, weights = torch.randn(6, TINY.hidden_size, generator=g), torch.rand(6, 2, generator=g)
    ids = torch.tensor([[0, 5], [1, 2], [7, 4], [3, 6], [5, 1], [2, 7]])
    torch.testing.assert_close(executor(1, x, ids, weights), whole(1, x, ids, weights), rtol=1e-6, atol=1e-6)


def test_generate_and_plan_take_the_flag(tiny_dir, capsys):
    from cluster.cli import main

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", "3", "--raw",
                 "--quantization", "fp8"]) == 0
    assert main(["plan", "--model", str(tiny_dir), "--gpus", "2", "--quantization", "fp8"]) == 0
    assert "experts in FP8" in capsys.readouterr().out
    assert main(["plan", "--model", str(tiny_dir), "--gpus", "2"]) == 0
    assert "FP8" not in capsys.readouterr().out


def test_without_quantization_the_experts_load_as_before(tiny_dir):
    """No quantization: the experts and their path are exactly those of before (same weights, no scales)."""
    layers = load_experts(CheckpointReader(tiny_dir), TINY, torch.bfloat16)
    assert all(w.scales is None and w.w13.dtype == torch.bfloat16 for w in layers)
