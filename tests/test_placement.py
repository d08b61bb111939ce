"""The placement planner: expert -> shard -> GPU maps and memory per GPU for the released configs, checked against
byte counts computed here from config.json numbers, refusals with their reasons, `moe-cluster plan`, and the unit
layout it shares with Serve's bundles (no GPU holding two channel ranks)."""

import json
import re
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from cluster.config import ModelConfig
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.parallel.layout import unit_layout
from cluster.parallel.placement import PlacementError, assign_experts, expert_owners, plan_placement

CONFIGS = Path(__file__).parent / "data" / "configs"
X22B, X7B, M7B = (CONFIGS / n for n in ("mixtral-8x22b-instruct", "mixtral-8x7b-instruct", "mistral-7b-instruct-v0.2"))
GiB = 2**30


def _hf(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _expert_bytes(path: Path, dtype_bytes: int = 2) -> int:
    """One expert of every layer: w1, w3 [F, D] and w2 [D, F]."""
    d = _hf(path)
    return 3 * d["hidden_size"] * d["intermediate_size"] * d["num_hidden_layers"] * dtype_bytes


def _dense_bytes(path: Path, dtype_bytes: int = 2) -> int:
    """Everything but the experts, from config.json keys (the head_dim key is absent in all three)."""
    d = _hf(path)
    hidden, ffn, vocab = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    head_dim = hidden // d["num_attention_heads"]
    q, kv = d["num_attention_heads"] * head_dim, d["num_key_value_heads"] * head_dim
    attention = hidden * q * 2 + hidden * kv * 2  # q, o; k, v
    mlp = hidden * d["num_local_experts"] if d.get("num_local_experts") else 3 * hidden * ffn  # router gate | SwiGLU
    per_layer = attention + mlp + 2 * hidden  # + two RMSNorms
    embeddings = vocab * hidden * (1 if d["tie_word_embeddings"] else 2)  # embed_tokens + lm_head
    return (d["num_hidden_layers"] * per_layer + embeddings + hidden) * dtype_bytes  # + final norm


def _kv_per_token(path: Path, dtype_bytes: int = 2) -> int:
    d = _hf(path)
    return 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * (d["hidden_size"] // d["num_attention_heads"]) \
        * dtype_bytes


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


# --- the released configs ---------------------------------------------------------------------------------------------

def test_mixtral_8x22b_on_8_gpus_of_80gib():
    p = plan_placement(ModelConfig.from_file(X22B), 8, 80 * GiB)
    expert, dense, usable = _expert_bytes(X22B), _dense_bytes(X22B), int(80 * GiB * 0.9)
    assert [(s.index, s.experts, s.gpu, s.weight_bytes) for s in p.shards] == [(i, (i,), i, expert) for i in range(8)]
    assert p.expert_owners() == list(range(8)) and p.replica_gpu == 0 and p.replica_bytes == dense
    # DESIGN.md: one expert of one layer is 604 MB, all experts ~270 GB; the replica ~10-11 GB.
    assert expert / 56 == pytest.approx(604e6, rel=1e-3) and 8 * expert == pytest.approx(270e9, rel=0.01)
    assert 10e9 < dense < 11e9
    gpu0, *rest = p.memory
    assert (gpu0.gpu, gpu0.expert_bytes, gpu0.replica_bytes, gpu0.usable_bytes) == (0, expert, dense, usable)
    assert gpu0.kv_bytes == usable - expert - dense and gpu0.free_bytes == 0
    assert p.kv_bytes_per_token == _kv_per_token(X22B) == 229_376
    assert p.kv_tokens == (usable - expert - dense) // 229_376 >= 65536
    assert [(m.gpu, m.expert_bytes, m.replica_bytes, m.kv_bytes, m.free_bytes) for m in rest] == [
        (i, expert, 0, 0, usable - expert) for i in range(1, 8)]


def test_mixtral_8x22b_on_4_gpus_of_80gib_is_refused_with_the_numbers():
    expert, dense = _expert_bytes(X22B), _dense_bytes(X22B)
    with pytest.raises(PlacementError) as e:
        plan_placement(ModelConfig.from_file(X22B), 4, 80 * GiB)
    message = str(e.value)
    assert message.startswith(f"GPU 0 needs {_gb(2 * expert + dense)} of weights but only {_gb(80 * GiB * 0.9)} of "
                              f"{_gb(80 * GiB)} is usable (utilization 0.9)")
    assert f"shard 0 (experts 0, 1: {_gb(2 * expert)})" in message and f"replica ({_gb(dense)})" in message
    assert isinstance(e.value, ValueError)


def test_mixtral_8x7b_on_2_gpus():
    p = plan_placement(ModelConfig.from_file(X7B), 2, 80 * GiB)
    expert, dense = _expert_bytes(X7B), _dense_bytes(X7B)
    assert [s.experts for s in p.shards] == [(0, 1, 2, 3), (4, 5, 6, 7)] and [s.gpu for s in p.shards] == [0, 1]
    assert p.expert_owners() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [s.channel_rank for s in p.shards] == [None, 1]  # shard 0 shares GPU 0: it runs in the replica's process
    assert [s.weight_bytes for s in p.shards] == [4 * expert] * 2 and p.replica_gpu == 0
    assert [m.weight_bytes for m in p.memory] == [4 * expert + dense, 4 * expert]
    assert p.kv_tokens == (int(80 * GiB * 0.9) - 4 * expert - dense) // _kv_per_token(X7B)


def test_mistral_7b_dense_on_one_24gb_gpu():
    p = plan_placement(ModelConfig.from_file(M7B), 1, 24 * 10**9)
    dense = _dense_bytes(M7B)
    assert dense == pytest.approx(7.24e9 * 2, rel=0.01)  # Mistral 7B has 7.24B parameters
    assert p.shards == () and p.expert_owners() == [] and p.replica_gpu == 0
    (gpu0,) = p.memory
    assert (gpu0.expert_bytes, gpu0.replica_bytes, gpu0.kv_bytes) == (0, dense, int(24e9 * 0.9) - dense)
    assert p.kv_tokens == (int(24e9 * 0.9) - dense) // _kv_per_token(M7B) >= 32768


def test_a_dense_model_too_big_for_its_gpu():
    with pytest.raises(PlacementError, match=re.escape(f"needs {_gb(_dense_bytes(M7B))} of weights")) as e:
        plan_placement(ModelConfig.from_file(M7B), 1, 16 * 10**9)
    assert "Use a bigger GPU" in str(e.value)


def test_kv_room_shorter_than_one_context_is_refused():
    config = ModelConfig.from_file(M7B)
    per_token = _kv_per_token(M7B)
    gpu_memory = _dense_bytes(M7B) + 2000 * per_token  # weights + room for exactly 2,000 tokens
    with pytest.raises(PlacementError) as e:
        plan_placement(config, 1, gpu_memory, gpu_memory_utilization=1.0)
    assert str(e.value).startswith("the KV cache room on GPU 0 holds 2,000 tokens")
    assert str(e.value).endswith("fewer than one full context of 32,768 tokens")
    assert plan_placement(config, 1, gpu_memory, gpu_memory_utilization=1.0, min_kv_tokens=2000).kv_tokens == 2000
    with pytest.raises(PlacementError, match="fewer than the 2,001 tokens asked for"):
        plan_placement(config, 1, gpu_memory, gpu_memory_utilization=1.0, min_kv_tokens=2001)


def test_kv_bytes_per_token_matches_the_paged_cache():
    for path in (X22B, X7B, M7B):
        config = ModelConfig.from_file(path)
        assert config.kv_bytes_per_token(2) * 16 == kv_bytes_per_block(config, 16, torch.bfloat16)
        assert config.kv_bytes_per_token(4) * 16 == kv_bytes_per_block(config, 16, torch.float32)


def test_fp32_doubles_every_weight():
    p2 = plan_placement(ModelConfig.from_file(X7B), 8, 80 * GiB)
    p4 = plan_placement(ModelConfig.from_file(X7B), 8, 80 * GiB, dtype_bytes=4)
    assert [s.weight_bytes for s in p4.shards] == [_expert_bytes(X7B, 4)] * 8 == [2 * s.weight_bytes for s in p2.shards]
    assert p4.replica_bytes == _dense_bytes(X7B, 4) and p4.kv_bytes_per_token == _kv_per_token(X7B, 4)


def _fp8_expert_bytes(path: Path) -> int:
    """One expert of every layer in FP8: a byte per weight, and a float32 scale per output channel (w1 and w3: F
    each, w2: D)."""
    d = _hf(path)
    return _expert_bytes(path, 1) + (2 * d["intermediate_size"] + d["hidden_size"]) * 4 * d["num_hidden_layers"]


def test_mixtral_8x22b_in_fp8_fits_one_node_of_8_gpus_of_80gb():
    """Issue 27's goal: by the plan, 8x22B with FP8 experts on one 8 x 80 GB node (decimal GB, below 80 GiB)."""
    bf16 = plan_placement(ModelConfig.from_file(X22B), 8, 80 * 10**9)
    p = plan_placement(ModelConfig.from_file(X22B), 8, 80 * 10**9, quantization="fp8")
    expert, dense, usable = _fp8_expert_bytes(X22B), _dense_bytes(X22B), int(80e9 * 0.9)
    assert [(s.experts, s.gpu, s.weight_bytes) for s in p.shards] == [((i,), i, expert) for i in range(8)]
    assert 8 * expert == pytest.approx(270e9 / 2, rel=0.01)  # half the bf16 experts
    assert p.replica_bytes == dense == bf16.replica_bytes  # attention, router and lm_head stay in bf16
    assert [m.weight_bytes for m in p.memory] == [expert + dense] + [expert] * 7
    assert p.kv_tokens == (usable - expert - dense) // _kv_per_token(X22B) > 2 * 65536 > bf16.kv_tokens
    assert p.quantization == "fp8" and "experts in FP8" in p.format()


def test_fp8_experts_fit_where_bf16_ones_do_not():
    """8x7B (93 GB in bf16) on one 80 GB GPU, and 8x22B on four: refused in bf16, planned in FP8."""
    for path, gpus in ((X7B, 1), (X22B, 4)):
        config = ModelConfig.from_file(path)
        with pytest.raises(PlacementError, match="FP8 experts"):
            plan_placement(config, gpus, 80 * 10**9)
        p = plan_placement(config, gpus, 80 * 10**9, quantization="fp8")
        assert p.memory[0].expert_bytes == 8 // gpus * _fp8_expert_bytes(path)
        assert p.memory[0].weight_bytes == 8 // gpus * _fp8_expert_bytes(path) + _dense_bytes(path)
        assert p.kv_tokens >= config.max_position_embeddings


def test_cli_plan_counts_fp8_experts(capsys):
    assert main(["plan", "--model", str(X7B), "--gpus", "1", "--gpu-memory", "80GB", "--quantization", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "experts in FP8" in out and f"{8 * _fp8_expert_bytes(X7B) / 1e9:.1f}" in out
    assert main(["plan", "--model", str(X7B), "--gpus", "1", "--gpu-memory", "80GB"]) == 2  # bf16: refused


def test_the_replica_takes_the_first_free_gpu():
    p = plan_placement(ModelConfig.from_file(X22B), 8, 80 * GiB, num_shards=4)
    expert, dense, usable = _expert_bytes(X22B), _dense_bytes(X22B), int(80 * GiB * 0.9)
    assert [s.experts for s in p.shards] == [(0, 1), (2, 3), (4, 5), (6, 7)] and p.replica_gpu == 4
    assert [s.channel_rank for s in p.shards] == [1, 2, 3, 4] and p.layout.local_shards == ()  # all their own GPU
    assert [(m.expert_bytes, m.replica_bytes) for m in p.memory] == [(2 * expert, 0)] * 4 + [(0, dense)] + [(0, 0)] * 3
    assert p.memory[4].kv_bytes == usable - dense and p.kv_tokens == (usable - dense) // _kv_per_token(X22B)


def test_more_gpus_than_experts_default_to_one_shard_per_expert():
    p = plan_placement(ModelConfig.from_file(X7B), 12, 80 * GiB)
    assert len(p.shards) == 8 and p.replica_gpu == 8 and len(p.memory) == 12
    assert [m.weight_bytes for m in p.memory[9:]] == [0, 0, 0]


def test_cpu_shards_report_host_memory_and_never_refuse():
    p = plan_placement(ModelConfig.from_file(X22B), 0, num_shards=2)  # ~280 GB: too big for any host, still planned
    expert = _expert_bytes(X22B)
    assert [(s.experts, s.gpu, s.weight_bytes) for s in p.shards] == [((0, 1, 2, 3), None, 4 * expert),
                                                                       ((4, 5, 6, 7), None, 4 * expert)]
    assert p.replica_gpu is None and p.kv_tokens is None and p.expert_owners() == [0] * 4 + [1] * 4
    assert [(m.device, m.gpu, m.weight_bytes, m.usable_bytes) for m in p.memory] == [
        ("CPU shard 0", None, 4 * expert, None), ("CPU shard 1", None, 4 * expert, None),
        ("CPU replica", None, _dense_bytes(X22B), None)]
    assert "CPU shard 1" in p.format()


def test_format_shows_the_map_and_memory_per_gpu():
    text = plan_placement(ModelConfig.from_file(X7B), 2, 80 * GiB).format()
    expert, dense, usable = _expert_bytes(X7B), _dense_bytes(X7B), int(80 * GiB * 0.9)
    for e in range(8):
        assert re.search(rf"expert +{e} -> shard +{e // 4} -> GPU {e // 4}\n", text)
    assert re.search(r"attention/router replica .*-> GPU 0\n", text)

    def numbers(*sizes: int) -> str:  # one table row's GB columns
        return r"\s+".join(f"{x / 1e9:.1f}" for x in sizes)

    kv = usable - 4 * expert - dense
    assert re.search(r"GPU 0\s+" + numbers(4 * expert, dense, 4 * expert + dense, kv, 0, usable), text)
    assert re.search(r"GPU 1\s+" + numbers(4 * expert, 0, 4 * expert, 0, usable - 4 * expert, usable), text)
    assert f"{kv // _kv_per_token(X7B):,} tokens" in text


@pytest.mark.parametrize("path, kwargs, message", [
    (X7B, dict(num_gpus=-1, gpu_memory=GiB), "need at least one GPU"),
    (X7B, dict(num_gpus=0), "num_gpus=0 with num_shards"),
    (X7B, dict(num_gpus=8, gpu_memory=GiB, num_shards=9), "9 shards for 8 experts"),
    (X7B, dict(num_gpus=2, gpu_memory=GiB, num_shards=4), "4 shards on 2 GPUs"),
    (X7B, dict(num_gpus=2, gpu_memory=GiB, num_shards=0), "at least one expert shard"),
    (X7B, dict(num_gpus=0, num_shards=9), "9 shards for 8 experts"),
    (M7B, dict(num_gpus=1, gpu_memory=GiB, num_shards=1), "dense model has no experts"),
    (X7B, dict(num_gpus=2), "gpu_memory must be a positive"),
    (X7B, dict(num_gpus=2, gpu_memory=0), "gpu_memory must be a positive"),
    (X7B, dict(num_gpus=2, gpu_memory=GiB, gpu_memory_utilization=0), "gpu_memory_utilization must be in (0, 1]"),
    (X7B, dict(num_gpus=2, gpu_memory=GiB, gpu_memory_utilization=1.5), "gpu_memory_utilization must be in (0, 1]"),
    (X7B, dict(num_gpus=2, gpu_memory=GiB, dtype_bytes=0), "dtype_bytes must be >= 1"),
    (X7B, dict(num_gpus=2, gpu_memory=GiB, min_kv_tokens=-1), "min_kv_tokens must be >= 0"),
])
def test_bad_arguments(path, kwargs, message):
    with pytest.raises(PlacementError, match=re.escape(message)):
        plan_placement(ModelConfig.from_file(path), **kwargs)


# --- assign_experts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("experts, shards, groups", [
    (8, 3, [(0, 1, 2), (3, 4, 5), (6, 7)]),
    (8, 8, [(i,) for i in range(8)]),
    (8, 1, [tuple(range(8))]),
    (1, 1, [(0,)]),
    (7, 2, [(0, 1, 2, 3), (4, 5, 6)]),
    (8, 5, [(0, 1), (2, 3), (4, 5), (6,), (7,)]),
])
def test_assign_experts(experts, shards, groups):
    assert assign_experts(experts, shards) == groups


def test_assign_experts_covers_every_expert_once_in_balanced_contiguous_groups():
    for n in range(1, 17):
        for s in range(1, n + 1):
            groups = assign_experts(n, s)
            assert [e for g in groups for e in g] == list(range(n))
            assert max(map(len, groups)) - min(map(len, groups)) <= 1
            owners = expert_owners(groups)
            assert all(e in groups[owners[e]] for e in range(n))


@pytest.mark.parametrize("experts, shards, message", [(8, 0, "at least one expert shard"), (8, 9, "9 shards for 8"),
                                                       (0, 1, "1 shards for 0")])
def test_assign_experts_refuses(experts, shards, message):
    with pytest.raises(ValueError, match=message):
        assign_experts(experts, shards)


# --- moe-cluster plan -----------------------------------------------------------------------------------------------

def test_cli_plan_prints_the_table(capsys):
    assert main(["plan", "--model", str(X22B), "--gpus", "8"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert all(re.search(rf"expert +{e} -> shard +{e} -> GPU {e}\n", out) for e in range(8))
    assert re.search(r"attention/router replica .*-> GPU 0\n", out) and "GPU 7" in out
    usable = int(80 * GiB * 0.9)
    kv = usable - _expert_bytes(X22B) - _dense_bytes(X22B)
    assert f"{kv // _kv_per_token(X22B):,} tokens" in out


def test_cli_plan_refuses_with_the_reason(capsys):
    assert main(["plan", "--model", str(X22B), "--gpus", "4", "--gpu-memory", "80GiB"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"moe-cluster plan: error: GPU 0 needs {_gb(2 * _expert_bytes(X22B) + _dense_bytes(X22B))}"
                          f" of weights but only {_gb(80 * GiB * 0.9)} of {_gb(80 * GiB)} is usable")


@pytest.mark.parametrize("args, code, text", [
    (["--model", str(M7B), "--gpus", "1", "--gpu-memory", "24GB"], 0, "-> GPU 0"),
    (["--model", str(X7B), "--gpus", "2", "--dtype", "fp32"], 2,
     f"needs {_gb(4 * _expert_bytes(X7B, 4) + _dense_bytes(X7B, 4))}"),
    (["--model", str(X7B), "--gpus", "2", "--gpu-memory-utilization", "0.5"], 2, f"only {_gb(80 * GiB * 0.5)} of"),
    (["--model", str(X7B), "--gpus", "2", "--shards", "3"], 2, "3 shards on 2 GPUs"),
    (["--model", str(X7B), "--gpus", "0", "--shards", "2"], 0, "CPU shard 1"),
    (["--model", str(X22B / "config.json"), "--gpus", "8"], 0, "-> GPU 7"),
    (["--model", "/nonexistent/model", "--gpus", "1"], 2, "no config.json"),
])
def test_cli_plan_options(args, code, text, capsys):
    assert main(["plan", *args]) == code
    out, err = capsys.readouterr()
    assert text in (out if code == 0 else err)


# --- the unit layout: the planner and Serve's reservation agree -------------------------------------------------------

@pytest.mark.parametrize("shards", range(1, 9))
@pytest.mark.parametrize("spare", [False, True], ids=["replica-shares-gpu0", "replica-on-its-own-gpu"])
def test_serve_bundles_reserve_what_the_planner_plans(shards, spare):
    pytest.importorskip("ray")
    from cluster.serve.args import ServeArgs
    from cluster.serve.resolved import unit_layout_of
    from cluster.serve.unit import replica_gpus, shard_options, unit_bundles

    config = ModelConfig.from_file(X7B)
    gpus = shards + spare
    plan = plan_placement(config, gpus, 200 * GiB, num_shards=shards, min_kv_tokens=0)
    args = ServeArgs(shards=shards, gpus=gpus if spare else None)
    layout = unit_layout_of(args, config, "cuda")
    assert layout == plan.layout and layout.strategy == "STRICT_PACK"
    bundles = unit_bundles(args, layout)

    # Which bundle holds which shard: the replica's bundle 0 (a shard in its process), else the one of its rank.
    expected_ranks = list(range(1, shards + 1)) if spare else [None] + list(range(1, shards))
    assert [s.channel_rank for s in plan.shards] == expected_ranks
    gpu_asks = {0: [replica_gpus(layout)]}  # bundle -> the GPUs its processes ask for
    bundle_gpu = {0: plan.replica_gpu}  # bundle -> the planned GPU it stands for
    for s in plan.shards:
        if s.channel_rank is None:
            assert s.gpu == plan.replica_gpu and layout.bundle_index(s.index) == 0
            with pytest.raises(ValueError, match="replica's process"):
                shard_options(args, layout, s.index)
        else:
            options = shard_options(args, layout, s.index)
            assert options["bundle"] == s.channel_rank == layout.bundle_index(s.index)
            assert options["bundle"] not in bundle_gpu, "two shards in one bundle"
            gpu_asks[options["bundle"]] = [options["num_gpus"]]
            bundle_gpu[options["bundle"]] = s.gpu

    # GPU count per bundle: one whole GPU, asked for by exactly one process (NCCL rank) in it.
    assert sorted(gpu_asks) == list(range(len(bundles)))
    assert all(b["GPU"] == 1 and gpu_asks[i] == [1] for i, b in enumerate(bundles))
    assert bundles[0]["CPU"] == args.replica_cpus and all(b["CPU"] == args.shard_cpus for b in bundles[1:])
    # No GPU holds two channel ranks, and the bundles cover exactly the GPUs the plan puts weights on.
    rank_gpus = list(bundle_gpu.values())
    assert len(set(rank_gpus)) == len(rank_gpus) == len(bundles) == layout.num_gpus == gpus
    assert sorted(rank_gpus) == [m.gpu for m in plan.memory if m.weight_bytes]
    replica_row = plan.memory[plan.replica_gpu]
    assert replica_row.replica_bytes == plan.replica_bytes
    assert replica_row.expert_bytes == sum(s.weight_bytes for s in plan.shards if s.channel_rank is None)


@pytest.mark.parametrize("shards", range(1, 9))
def test_cpu_units_keep_every_shard_in_its_own_process(shards):
    pytest.importorskip("ray")
    from cluster.serve.args import ServeArgs
    from cluster.serve.resolved import unit_layout_of
    from cluster.serve.unit import replica_gpus, shard_options, unit_bundles

    config = ModelConfig.from_file(X7B)
    args = ServeArgs(shards=shards, gpus=3)  # gpus applies to CUDA only
    layout = unit_layout_of(args, config, "cpu")
    plan = plan_placement(config, 0, num_shards=shards)
    assert layout == plan.layout and layout.strategy == "PACK" and layout.local_shards == ()
    assert [s.channel_rank for s in plan.shards] == list(range(1, shards + 1))
    assert unit_bundles(args, layout) == [{"CPU": args.replica_cpus}] + [{"CPU": args.shard_cpus}] * shards
    assert replica_gpus(layout) == 0
    assert [shard_options(args, layout, s) for s in range(shards)] == [
        {"num_cpus": args.shard_cpus, "num_gpus": 0, "bundle": s + 1} for s in range(shards)]


def test_a_dense_unit_is_the_replica_on_one_gpu():
    pytest.importorskip("ray")
    from cluster.serve.args import ServeArgs
    from cluster.serve.resolved import unit_layout_of
    from cluster.serve.unit import unit_bundles

    config = ModelConfig.from_file(M7B)
    layout = unit_layout_of(ServeArgs(), config, "cuda")
    assert layout == plan_placement(config, 1, 80 * GiB).layout
    assert unit_bundles(ServeArgs(), layout) == [{"CPU": 0.5, "GPU": 1}]


@pytest.mark.parametrize("shards, gpus", [(4, 3), (4, 6), (2, 1)])
def test_serve_args_refuse_gpu_counts_no_layout_uses(shards, gpus):
    from cluster.serve.args import ServeArgs
    from cluster.serve.resolved import unit_layout_of

    with pytest.raises(ValueError, match=re.escape(f"a unit uses {shards} GPUs (the replica sharing GPU 0) or "
                                                   f"{shards + 1} (the replica on its own)")):
        unit_layout_of(ServeArgs(shards=shards, gpus=gpus), ModelConfig.from_file(X7B), "cuda")
    with pytest.raises(ValueError, match="a dense model"):
        unit_layout_of(ServeArgs(gpus=2), ModelConfig.from_file(M7B), "cuda")


def test_the_layout_rule_refuses_fewer_gpus_than_shards():
    with pytest.raises(ValueError, match="4 shards on 3 GPUs: each shard needs a GPU of its own"):
        unit_layout(4, "cuda", 3)
    with pytest.raises(ValueError, match="num_shards must be >= 0"):
        unit_layout(-1, "cpu")


def test_the_plan_names_the_channel_ranks():
    shared = plan_placement(ModelConfig.from_file(X7B), 2, 80 * GiB).format()
    assert "rank   0 -> attention/router replica + the experts of shard 0 (same process) -> GPU 0\n" in shared
    assert "rank   1 -> shard 1 -> GPU 1\n" in shared and "rank   2" not in shared
    spare = plan_placement(ModelConfig.from_file(X7B), 3, 80 * GiB, num_shards=2).format()
    assert "rank   0 -> attention/router replica -> GPU 2\n" in spare
    assert "rank   1 -> shard 0 -> GPU 0\n" in spare and "rank   2 -> shard 1 -> GPU 1\n" in spare


# --- data-parallel attention: every GPU attends ----------------------------------------------------------------------

def test_data_parallel_attention_holds_8x_the_kv_of_one_attending_gpu():
    """Issue goal: 8x22B bf16 on 8 x 80 GiB holds >= 8x the KV tokens per node when each GPU runs a rank with its own
    KV cache. Every GPU then holds the dense weights, one shard and a KV cache in the room left there."""
    config = ModelConfig.from_file(X22B)
    one = plan_placement(config, 8, 80 * GiB)
    every = plan_placement(config, 8, 80 * GiB, attention_ranks=8)
    expert, dense, usable = _expert_bytes(X22B), _dense_bytes(X22B), int(80 * GiB * 0.9)
    assert [(m.gpu, m.expert_bytes, m.replica_bytes, m.kv_bytes, m.free_bytes) for m in every.memory] == [
        (g, expert, dense, usable - expert - dense, 0) for g in range(8)]
    assert every.kv_tokens == 8 * ((usable - expert - dense) // 229_376) >= 8 * one.kv_tokens
    assert every.layout.data_parallel and every.layout.num_gpus == 8 and every.shards[3].gpu == 3
    # Of the room a node has after one copy of every weight, the ranks' caches take what the dense copies leave.
    after_one_copy = 8 * usable - 8 * expert - dense
    assert sum(m.kv_bytes for m in every.memory) == after_one_copy - 7 * dense


def test_data_parallel_plan_format_names_every_rank_and_the_node_total(capsys):
    text = plan_placement(ModelConfig.from_file(X7B), 2, 80 * GiB, attention_ranks=2).format()
    assert "rank   0 -> attention + KV cache + shard 0 -> GPU 0\n" in text
    assert "rank   1 -> attention + KV cache + shard 1 -> GPU 1\n" in text
    assert "attention/router (" in text and "-> every rank (GPUs 0-1)" in text
    assert re.search(r"on each of 2 GPUs \(one rank each\) = [\d,]+\+ tokens a rank, [\d,]+ tokens in all", text)
    assert main(["plan", "--model", str(X7B), "--gpus", "2", "--attention-ranks", "2"]) == 0
    assert "tokens in all" in capsys.readouterr().out


@pytest.mark.parametrize("path, kwargs, message", [
    (M7B, dict(num_gpus=2, attention_ranks=2), "a dense model has none"),
    (X7B, dict(num_gpus=4, attention_ranks=2), "2 attention ranks take 2 GPUs, one each; got 4"),
    (X7B, dict(num_gpus=2, attention_ranks=2, num_shards=1), "shards must be 2, not 1"),
    (X7B, dict(num_gpus=9, attention_ranks=9), "9 attention ranks for 8 experts"),
    (X7B, dict(num_gpus=2, attention_ranks=0), "attention_ranks must be >= 1"),
])
def test_data_parallel_plans_refuse_what_has_no_layout(path, kwargs, message):
    with pytest.raises(PlacementError, match=re.escape(message)):
        plan_placement(ModelConfig.from_file(path), gpu_memory=200 * GiB, **kwargs)


def test_data_parallel_kv_must_hold_a_context_on_each_rank():
    with pytest.raises(PlacementError, match="KV cache room on GPU 0 holds"):
        plan_placement(ModelConfig.from_file(X22B), 8, 80 * GiB, attention_ranks=8, min_kv_tokens=200_000)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_data_parallel_bundles_reserve_a_gpu_per_rank_and_none_for_the_replica(device):
    pytest.importorskip("ray")
    from cluster.serve.args import ServeArgs
    from cluster.serve.resolved import unit_layout_of
    from cluster.serve.unit import replica_gpus, unit_bundles

    config = ModelConfig.from_file(X7B)
    args = ServeArgs(shards=4, attention_ranks=4)
    layout = unit_layout_of(args, config, device)
    assert layout == plan_placement(config, 4 if device == "cuda" else 0, 200 * GiB, attention_ranks=4).layout
    gpu = {"GPU": 1} if device == "cuda" else {}
    assert unit_bundles(args, layout) == [{"CPU": args.replica_cpus}] + [{"CPU": args.replica_cpus, **gpu}] * 4
    assert replica_gpus(layout) == 0 and layout.num_gpus == (4 if device == "cuda" else 0)
    with pytest.raises(ValueError, match="attention_ranks=4 holds one expert shard on each rank: set shards to 4"):
        unit_layout_of(ServeArgs(shards=2, attention_ranks=4), config, device)
