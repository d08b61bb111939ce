"""Fused-MoE Triton kernels (compiled on a GPU, the interpreter on CPU) against a float64 reference from the definition.

Legend: T = tokens, K = experts per token, D = hidden, F = ffn, E = experts, P = T*K pairs, C = padded capacity.
Inputs are random from fixed seeds (parametrised; the seed is in every failure message). Everything the kernels see
lives on the `device` fixture; the float64 reference runs on CPU copies. Alignment has its own tests (test_align.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from cluster.kernels import tuning  # noqa: E402
from cluster.kernels.align import align_pairs  # noqa: E402
from cluster.kernels.fused_moe import down, even_tiles, fused_experts, gate_up  # noqa: E402
from cluster.moe.torch_backend import TorchMoEBackend  # noqa: E402
from cluster.moe.triton_backend import TritonMoEBackend  # noqa: E402
from cluster.moe.weights import ExpertWeights, _expert_map  # noqa: E402

# ||out - ref|| / ||ref|| bounds: fp32 sums in a different order; bf16/fp16 also round the [P, F] intermediate
# and the output (2^-8 relative per element, averaging down over D).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
SEEDS = [0, 1, 2]


def make_weights(held: list[int], d: int, f: int, dtype: torch.dtype, device: torch.device,
                 g: torch.Generator) -> ExpertWeights:
    w13 = torch.randn(len(held), 2 * f, d, generator=g) / d**0.5  # [E_local, 2F, D]
    w2 = torch.randn(len(held), d, f, generator=g) / f**0.5  # [E_local, D, F]
    return ExpertWeights(w13.to(device, dtype), w2.to(device, dtype), tuple(held))


def route(t: int, k: int, num_experts: int, g: torch.Generator, allowed: list[int] | None = None,
          skew: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] distinct experts per token (only from `allowed`), skewed towards low ids; fp32 weights [T, K]
    (what the router hands the experts). On CPU: callers move them."""
    allowed = list(range(num_experts)) if allowed is None else allowed
    logits = torch.full((t, num_experts), float("-inf"))
    logits[:, allowed] = torch.randn(t, len(allowed), generator=g) - skew * torch.arange(len(allowed)).float()
    ids = torch.multinomial(torch.softmax(logits, dim=-1), k, generator=g)  # without replacement
    return ids, torch.softmax(torch.randn(t, k, generator=g), dim=-1)


def reference(x: torch.Tensor, w: ExpertWeights, ids: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
    """float64 on CPU, per token: sum_k w_k * W2_e (silu(W1_e x) * W3_e x) over the experts the shard holds."""
    x, ids, tw = x.cpu(), ids.cpu(), tw.cpu()
    w13, w2s = w.w13.cpu(), w.w2.cpu()
    f = w2s.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e not in w.expert_ids:
                continue
            i = w.expert_ids.index(e)
            w1, w3, w2 = w13[i, :f].double(), w13[i, f:].double(), w2s[i].double()
            out[t] += float(tw[t, k]) * (w2 @ (F.silu(w1 @ xt) * (w3 @ xt)))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t, held, dtype", [
    (21, [1, 4, 6], torch.float32),  # few rows per expert: the batched path
    (300, [1, 4, 6], torch.float32),  # > batched_max_rows on some expert: the per-expert path
    (1, list(range(8)), torch.float32),
    (150, list(range(8)), torch.bfloat16),  # bf16 on CPU pads row counts to the bucket; fp32 router weights
    (40, [0, 7], torch.bfloat16),
])
def test_torch_backend_matches_reference(t: int, held: list[int], dtype: torch.dtype, seed: int,
                                         device: torch.device) -> None:
    g = torch.Generator().manual_seed(seed)
    w = make_weights(held, 64, 96, dtype, device, g)
    x = torch.randn(t, 64, generator=g).to(device, dtype)
    ids, tw = route(t, 2, 8, g, skew=0.3)
    run = TorchMoEBackend()
    out = run(x, run.prepare(w), ids.to(device), tw.to(device), 8)
    err = rel_err(out, reference(x, w, ids, tw))
    assert err < TOL[dtype], f"seed {seed}: rel err {err}"


CASES = {
    # name: (T, K, D, F, held experts of 8, routing restricted to, skew)
    "uneven": (45, 2, 96, 160, list(range(8)), None, 0.6),
    "empty_experts": (19, 2, 64, 96, list(range(8)), [0, 3, 5], 0.0),
    "single_token": (1, 2, 128, 256, list(range(8)), None, 0.0),
    "subset_shard": (33, 2, 64, 224, [1, 4, 6], None, 0.2),
    "top3_one_expert_shard": (13, 3, 80, 128, [2], None, 0.0),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend(case: str, dtype: torch.dtype, seed: int, device: torch.device) -> None:
    t, k, d, f, held, allowed, skew = CASES[case]
    g = torch.Generator().manual_seed(seed)
    w = make_weights(held, d, f, dtype, device, g)
    x = torch.randn(t, d + 16, generator=g).to(device, dtype)[:, 8:8 + d]  # non-contiguous rows
    ids, tw = route(t, k, 8, g, allowed, skew)
    run = TritonMoEBackend()
    out = run(x, run.prepare(w), ids.to(device), tw.to(device), 8)
    assert out.shape == (t, d) and out.dtype == dtype and out.device.type == device.type
    err = rel_err(out, reference(x, w, ids, tw))
    assert err < TOL[dtype], f"{case} seed {seed}: rel err {err} >= {TOL[dtype]}"


@pytest.mark.parametrize("seed", SEEDS)
def test_triton_fp16_int32_ids_low_precision_router_weights(seed: int, device: torch.device) -> None:
    """int32 ids (the token channel's) and fp16 router weights (used in fp32) are accepted too."""
    g = torch.Generator().manual_seed(seed)
    w = make_weights(list(range(8)), 64, 96, torch.float16, device, g)
    x = torch.randn(9, 64, generator=g).to(device, torch.float16)
    ids, tw = route(9, 2, 8, g)
    run = TritonMoEBackend()
    out = run(x, run.prepare(w), ids.to(device, torch.int32), tw.to(device, torch.float16), 8)
    err = rel_err(out, reference(x, w, ids, tw.half()))
    assert err < TOL[torch.float16], f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_router_weights_are_used_in_fp32(backend: str, device: torch.device) -> None:
    """bf16 activations and experts, fp32 router weights: scaling the weights by 1 + 2^-10 (below bf16's 2^-8 step)
    scales the fp32 output by exactly that, which it could not if a backend rounded the weights to bf16."""
    g = torch.Generator().manual_seed(5)
    w = make_weights(list(range(8)), 64, 96, torch.bfloat16, device, g)
    x = torch.randn(12, 64, generator=g).to(device, torch.bfloat16)
    ids, tw = route(12, 2, 8, g)
    ids, tw = ids.to(device), tw.to(device)
    run = TorchMoEBackend() if backend == "torch" else TritonMoEBackend()
    layer = run.prepare(w)
    base = run(x, layer, ids, tw, 8, out_dtype=torch.float32)
    scaled = run(x, layer, ids, tw * (1 + 2**-10), 8, out_dtype=torch.float32)
    err = rel_err(scaled, base.cpu().double() * (1 + 2**-10))
    assert err < 1e-6, f"{backend}: rel err {err} (2^-10 = {2**-10:.1e} if the weights were rounded)"


def test_moe_layer_hands_fp32_router_weights_to_the_experts() -> None:
    from cluster.model.moe import MoELayer

    seen = []
    layer = MoELayer(hidden=32, num_experts=4, top_k=2, layer=0).to(torch.bfloat16)
    layer.executor = lambda i, x, ids, weights: seen.append(weights) or x
    layer(torch.randn(5, 32, dtype=torch.bfloat16))
    assert seen[0].dtype == torch.float32 and seen[0].shape == (5, 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_triton_no_local_tokens(seed: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(seed)
    w = make_weights([1, 4, 6], 64, 96, torch.float32, device, g)
    ids, tw = route(7, 2, 8, g, allowed=[0, 2, 3, 5, 7])
    ids, tw = ids.to(device), tw.to(device)
    run = TritonMoEBackend()
    layer = run.prepare(w)
    out = run(torch.randn(7, 64, generator=g).to(device), layer, ids, tw, 8)
    assert out.shape == (7, 64) and (out == 0).all(), seed
    empty = run(torch.randn(0, 64, device=device), layer, ids[:0], tw[:0], 8)
    assert empty.shape == (0, 64)


@pytest.mark.parametrize("seed", SEEDS)
def test_kernels_write_everything(seed: int, device: torch.device) -> None:
    """Launch the two kernels on NaN-poisoned buffers: every slot/pair they own is written, nothing else."""
    t, k, d, f, held = 23, 2, 64, 96, [0, 2, 3, 5, 7]
    g = torch.Generator().manual_seed(seed)
    w = make_weights(held, d, f, torch.float32, device, g)
    x = torch.randn(t, d, generator=g).to(device)
    ids, tw = route(t, k, 8, g, skew=0.4)
    cfg = tuning.default_config(t)
    emap = _expert_map(tuple(held), 8, device)
    a = align_pairs(ids.to(device), emap, len(held), cfg.block_m)
    total, p = int(a.total), t * k
    sorted_ids = a.sorted_ids.cpu()

    h = torch.full((a.sorted_ids.numel(), f), float("nan"), device=device)  # [C, F]
    gate_up(x, w.w13, h, a, k, cfg.gate_up)
    h = h.cpu()
    assert not h[:total].isnan().any(), f"seed {seed}: gate_up left slots unwritten"
    assert (h[:total][sorted_ids[:total] == p] == 0).all(), seed  # padding rows are exact zeros
    assert h[total:].isnan().all(), seed  # blocks past the total are skipped

    y = torch.full((p, d), float("nan"), device=device)  # [P, D]
    down(h.to(device), w.w2, y, tw.to(device).contiguous(), a, cfg.down)
    y = y.cpu()
    local = emap.cpu()[ids.flatten()] >= 0  # [P]
    assert not y[local].isnan().any(), f"seed {seed}: down left local pairs unwritten"
    assert y[~local].isnan().all(), seed  # pairs held elsewhere untouched
    err = rel_err(y.nan_to_num(0.0).view(t, k, d).sum(1), reference(x, w, ids, tw))
    assert err < TOL[torch.float32], f"seed {seed}: rel err {err}"


def test_down_refuses_low_precision_router_weights(device: torch.device) -> None:
    """The down launcher takes fp32 weights only (`fused_experts` converts), so a weight is never read rounded."""
    g = torch.Generator().manual_seed(0)
    w = make_weights([0, 1], 64, 96, torch.float32, device, g)
    ids, tw = route(4, 2, 2, g)
    cfg = tuning.default_config(4)
    a = align_pairs(ids.to(device), _expert_map((0, 1), 2, device), 2, cfg.block_m)
    h = torch.zeros(a.sorted_ids.numel(), 96, device=device)
    with pytest.raises(ValueError, match="fp32"):
        down(h, w.w2, torch.zeros(8, 64, device=device), tw.to(device, torch.bfloat16), a, cfg.down)


# ---------------------------------------------------------------------------------------------------------------
# Unmasked fast paths: EVEN_K / EVEN_N per kernel, chosen at launch from the layer's shape.

# One tile for both kernels: gate_up's N tile is 32 (BLOCK_N // 2 of gate and of up), down's 64; both K tiles 32.
MASK_TILES = tuning.MoEConfig(tuning.KernelConfig(32, 64, 32, 1), tuning.KernelConfig(32, 64, 32, 1))
# (D, F): between them every (EVEN_K, EVEN_N) of each kernel under MASK_TILES (see the test below); Mixtral's own
# shapes are all-even.
MASK_SHAPES = [(128, 96), (128, 80), (80, 64), (72, 72)]


def mask_flags(d: int, f: int, cfg: tuning.MoEConfig) -> tuple[tuple[bool, bool], tuple[bool, bool]]:
    """((EVEN_K, EVEN_N) of gate_up, (EVEN_K, EVEN_N) of down) as the launchers pick them."""
    gu = even_tiles(d, f, cfg.gate_up.BLOCK_K, cfg.gate_up.BLOCK_N // 2)
    dn = even_tiles(f, d, cfg.down.BLOCK_K, cfg.down.BLOCK_N)
    return (gu["EVEN_K"], gu["EVEN_N"]), (dn["EVEN_K"], dn["EVEN_N"])


def test_mask_shapes_cover_every_flag_combination() -> None:
    every = {(True, True), (True, False), (False, True), (False, False)}
    flags = [mask_flags(d, f, MASK_TILES) for d, f in MASK_SHAPES]
    assert {gu for gu, _ in flags} == every and {dn for _, dn in flags} == every, flags


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d, f", MASK_SHAPES)
def test_fused_experts_on_every_mask_path(d: int, f: int, dtype: torch.dtype, seed: int,
                                          device: torch.device) -> None:
    """Both kernels under MASK_TILES, on fresh inputs, against the float64 reference: the unmasked paths where D and
    F fill whole tiles, the masked ones where they do not; padded pair rows (uneven routing) throughout."""
    t, k, held = 37, 2, [0, 2, 3, 5, 6]
    g = torch.Generator().manual_seed(1000 * seed + d + f)
    w = make_weights(held, d, f, dtype, device, g)
    x = torch.randn(t, d, generator=g).to(device, dtype)
    ids, tw = route(t, k, 8, g, skew=0.5)
    aligned = align_pairs(ids.to(device), _expert_map(tuple(held), 8, device), len(held), MASK_TILES.block_m)
    out = fused_experts(x, w.w13, w.w2, tw.to(device), aligned, MASK_TILES)
    err = rel_err(out, reference(x, w, ids, tw))
    assert err < TOL[dtype], f"D={d} F={f} flags {mask_flags(d, f, MASK_TILES)} seed {seed}: rel err {err}"


# ---------------------------------------------------------------------------------------------------------------
# Tuning tables and warm-up.

TABLE = {"1": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
         "256": {"gate_up": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64},
                 "down": {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8}}}


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """An empty config directory seen as the only one, on a pretend GPU called Fake GPU."""
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuning, "device_name", lambda device: "Fake_GPU")
    tuning.load_configs.cache_clear()
    yield tmp_path
    tuning.load_configs.cache_clear()


def test_tuning_table(config_dir, monkeypatch) -> None:
    monkeypatch.setattr(tuning, "interpreting", lambda: False)  # the GPU's defaults, not the interpreter's
    (config_dir / tuning.config_file_name(8, 512, "Fake GPU")).write_text(json.dumps(TABLE))
    assert tuning.get_config(3, 8, 512, "cuda").block_m == 16
    big = tuning.get_config(1000, 8, 512, "cuda")
    assert big.block_m == 64 and big.down.BLOCK_N == 256 and big.down.num_warps == 8
    assert tuning.get_config(3, 8, 1024, "cuda") == tuning.default_config(3)  # no file for this shape
    # Tables are tuned in 16-bit: fp32 keeps its own defaults, whose tiles past M = 32 are smaller than bf16's.
    assert tuning.get_config(1000, 8, 512, "cuda", torch.float32) == tuning.default_config(1000, torch.float32)
    fp32, bf16 = tuning.default_config(1000, torch.float32).gate_up, tuning.default_config(1000).gate_up
    assert fp32.BLOCK_M * fp32.BLOCK_N < bf16.BLOCK_M * bf16.BLOCK_N
    with pytest.raises(ValueError):
        tuning.MoEConfig(tuning.KernelConfig(16, 64, 64), tuning.KernelConfig(32, 64, 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("fp8_weights", [False, True], ids=["float", "fp8"])
def test_default_tiles_fit_and_take_mixtral_on_the_unmasked_paths(dtype: torch.dtype, fp8_weights: bool,
                                                                   monkeypatch) -> None:
    """The GPU's defaults at every M: within the shared memory the tuner allows (16-bit elements, an upper bound for
    FP8 weights), and Mixtral's experts (8x7B, 8x22B) fill whole tiles, so both kernels run unmasked."""
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    for m in (1, 32, 33, 255, 256, 511, 512, 1023, 1024, 4096, 8192):
        cfg = tuning.default_config(m, dtype, fp8_weights)
        for kernel in (cfg.gate_up, cfg.down):
            assert tuning.smem_bytes(kernel, max(2, dtype.itemsize)) <= tuning.SMEM_LIMIT, (m, kernel)
        for d, f in ((4096, 14336), (6144, 16384)):
            assert mask_flags(d, f, cfg) == ((True, True), (True, True)), (m, d, f, cfg)


def test_default_tiles_grow_from_256_where_shared_memory_holds_them(monkeypatch) -> None:
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    assert tuning.LARGE_TILES_SMEM <= tuning.SMEM_LIMIT
    mid, large = tuning.default_config(255), tuning.default_config(256)
    assert (large.block_m, large.gate_up.BLOCK_K) == (64, 128) and mid.block_m == 32
    assert tuning.default_config(512).gate_up.BLOCK_N == 256 and tuning.default_config(4096).block_m == 128
    h100, a100 = 232448, 166912  # per-block opt-in shared memory (CUDA's documented limits)
    assert tuning.default_config(4096, smem=h100) == tuning.default_config(4096)
    # A GPU with less shared memory keeps the tiles from before, which fit it.
    for m in (256, 512, 4096):
        cfg = tuning.default_config(m, smem=a100)
        assert cfg != tuning.default_config(m) and tuning.smem_bytes(cfg.gate_up) <= a100, m
    assert tuning.default_config(4096, smem=a100).gate_up == tuning.KernelConfig(128, 128, 64, 8, 8, 3)
    # fp32 keeps its own tiles everywhere.
    assert tuning.default_config(4096, torch.float32) == tuning.default_config(4096, torch.float32, smem=a100)


def test_tuning_tables_are_keyed_by_dtype_and_old_names_still_load(config_dir) -> None:
    def table(block_m: int, m: str = "1") -> str:
        return json.dumps({m: {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64}})

    def pick(dtype: torch.dtype, fp8: bool = False) -> int:
        tuning.load_configs.cache_clear()
        return tuning.get_config(1, 8, 512, "cuda", dtype, fp8).block_m

    assert tuning.dtype_key(torch.bfloat16) == "bf16" and tuning.dtype_key(torch.float16, True) == "fp8_fp16"
    name = tuning.config_file_name(8, 512, "Fake GPU", "3.6", dtype="bf16")
    assert name == "E=8,N=512,device=Fake_GPU,dtype=bf16,triton=3.6.json"
    (config_dir / tuning.config_file_name(8, 512, "Fake GPU")).write_text(table(128))  # before dtype was in the key
    assert pick(torch.bfloat16) == pick(torch.float16) == pick(torch.bfloat16, True) == 128
    assert pick(torch.float32) == tuning.default_config(1, torch.float32).block_m  # 16-bit tables: never fp32's
    (config_dir / tuning.config_file_name(8, 512, "Fake GPU", dtype="bf16")).write_text(table(16))
    (config_dir / tuning.config_file_name(8, 512, "Fake GPU", dtype="fp32")).write_text(table(64))
    (config_dir / tuning.config_file_name(8, 512, "Fake GPU", dtype="fp8_bf16")).write_text(table(32))
    assert (pick(torch.bfloat16), pick(torch.float16), pick(torch.float32), pick(torch.bfloat16, True)) == \
        (16, 128, 64, 32)


def test_default_entries_defer_to_the_defaults(config_dir, monkeypatch) -> None:
    """"default" (the tuner kept the default there) gives `default_config` at that M, not a neighbour's pick."""
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    tuned = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
    (config_dir / tuning.config_file_name(8, 512, "Fake GPU", dtype="bf16")).write_text(
        json.dumps({"1": tuned, "512": "default", "4096": tuned}))
    assert tuning.get_config(2, 8, 512, "cuda") == tuning.parse_config(tuned)
    for m in (400, 512, 1000):
        assert tuning.get_config(m, 8, 512, "cuda") == tuning.default_config(m), m
    assert tuning.get_config(4000, 8, 512, "cuda").block_m == 16


def test_config_file_name_carries_the_triton_version(monkeypatch) -> None:
    import triton

    major_minor = ".".join(triton.__version__.split(".")[:2])
    assert tuning.triton_version() == major_minor
    name = tuning.config_file_name(8, 16384, "NVIDIA H200")
    assert name == f"E=8,N=16384,device=NVIDIA_H200,triton={major_minor}.json"
    assert tuning.config_file_name(8, 16384, "NVIDIA H200", "3.6") == "E=8,N=16384,device=NVIDIA_H200,triton=3.6.json"
    monkeypatch.setattr(triton, "__version__", "3.6.0+git1234")
    assert tuning.triton_version() == "3.6"


def test_tuning_lookup_prefers_this_triton_then_the_nearest_then_unversioned(config_dir, monkeypatch) -> None:
    monkeypatch.setattr(tuning, "triton_version", lambda: "3.6")

    def table(block_m: int) -> str:
        return json.dumps({"1": {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64}})

    def pick() -> int:
        tuning.load_configs.cache_clear()
        return tuning.get_config(1, 8, 512, "cuda").block_m

    assert pick() == tuning.default_config(1).block_m  # no file at all
    (config_dir / "E=8,N=512,device=Fake_GPU.json").write_text(table(128))  # unversioned (before the key had it)
    assert pick() == 128
    (config_dir / tuning.config_file_name(8, 512, "Fake_GPU", "2.3")).write_text(table(16))
    (config_dir / tuning.config_file_name(8, 512, "Fake_GPU", "3.4")).write_text(table(32))
    (config_dir / tuning.config_file_name(8, 512, "Fake_GPU", "3.8")).write_text(table(64))
    assert pick() == 64  # 3.4 and 3.8 are as near: the newer
    (config_dir / tuning.config_file_name(8, 512, "Fake_GPU", "3.5")).write_text(table(16))
    assert pick() == 16  # the nearest
    (config_dir / tuning.config_file_name(8, 512, "Other_GPU", "3.6")).write_text(table(128))
    (config_dir / tuning.config_file_name(8, 1024, "Fake_GPU", "3.6")).write_text(table(128))
    assert pick() == 16  # another device's or shape's file never counts
    (config_dir / tuning.config_file_name(8, 512, "Fake_GPU", "3.6")).write_text(table(32))
    assert pick() == 32  # this Triton's own


def test_config_buckets(config_dir) -> None:
    (config_dir / tuning.config_file_name(8, 512, "Fake GPU")).write_text(json.dumps(TABLE))
    buckets = tuning.config_buckets(300, 8, 512, "cuda")
    assert [(lo, hi) for lo, hi, _ in buckets] == [(1, 128), (129, 300)]  # nearest entry: 1 up to 128, then 256
    assert [c.block_m for _, _, c in buckets] == [16, 64]
    for lo, hi, cfg in buckets:
        assert all(tuning.get_config(m, 8, 512, "cuda") == cfg for m in range(lo, hi + 1))
    assert [hi for _, hi, _ in tuning.config_buckets(5, 8, 512, "cuda")] == [5]


def test_warm_up_runs_every_distinct_config_once(config_dir, monkeypatch, device: torch.device) -> None:
    """Tiny shapes and a three-entry table whose first and last entries share a config: warm-up runs the layer
    once per distinct config reachable up to max_tokens (at a token count that picks it), and nothing else."""
    import cluster.moe.triton_backend as tb

    small = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1}
    table = {"1": small, "8": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, "40": small,
             "1000": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}}  # beyond max_tokens: never picked
    (config_dir / tuning.config_file_name(3, 32, "Fake GPU")).write_text(json.dumps(table))
    launched = []
    fused = tb.fused_experts
    monkeypatch.setattr(tb, "fused_experts", lambda *a: launched.append((a[0].shape[0], a[5])) or fused(*a))

    g = torch.Generator().manual_seed(0)
    w = make_weights([1, 4, 6], 32, 32, torch.bfloat16, device, g)
    backend = TritonMoEBackend()
    ran = backend.warm_up(backend.prepare(w), max_tokens=30, top_k=2, num_experts=8)
    wanted = {tuning.get_config(m, 3, 32, "cuda") for m in range(1, 31)}
    assert len(wanted) == 2 and len(ran) == 2 and {cfg for _, cfg in ran} == wanted
    assert launched == ran  # the kernels ran, once per config, each at a token count that picks it
    assert all(tuning.get_config(m, 3, 32, "cuda") == cfg for m, cfg in ran)
    assert backend.warm_up(backend.prepare(w), max_tokens=0) == []


@pytest.mark.e2e  # the whole model on the Triton path
def test_model_on_the_triton_backend_matches_torch(tiny_dir, device: torch.device) -> None:
    """The whole tiny model with its experts on the Triton kernels gives the torch backend's logits."""
    from cluster.model.kv_cache import ContiguousKVCache
    from cluster.model.loader import load_model

    logits = []
    tokens = torch.randint(0, 32768, (11,), generator=torch.Generator().manual_seed(0)).to(device)
    for backend in ("torch", "triton"):
        lm = load_model(tiny_dir, "fp32", device=device, backend=backend)
        c = lm.config
        cache = ContiguousKVCache(c.num_layers, 1, 16, c.num_kv_heads, c.head_dim, device=device)
        logits.append(lm.model.compute_logits(lm.model(tokens, cache.begin_step([0], [11]), cache)).cpu())
    rel = ((logits[1] - logits[0]).norm() / logits[0].norm()).item()
    assert rel < TOL[torch.float32], rel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_triton_backend_in_a_cuda_graph(device: torch.device) -> None:
    """After warm-up the whole layer (align + both kernels) captures into a CUDA graph: no host sync, no compile."""
    g = torch.Generator().manual_seed(0)
    w = make_weights(list(range(8)), 128, 256, torch.bfloat16, device, g)
    backend = TritonMoEBackend()
    layer = backend.prepare(w)
    backend.warm_up(layer, max_tokens=16, num_experts=8)
    x = torch.randn(16, 128, generator=g).to(device, torch.bfloat16)
    ids, tw = (t.to(device) for t in route(16, 2, 8, g))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend(x, layer, ids, tw, 8)
    for seed in (1, 2):
        g2 = torch.Generator().manual_seed(seed)
        new_ids, new_tw = route(16, 2, 8, g2, skew=float(seed))
        x.copy_(torch.randn(16, 128, generator=g2).to(device, torch.bfloat16))
        ids.copy_(new_ids.to(device))
        tw.copy_(new_tw.to(device))
        graph.replay()
        torch.cuda.synchronize()
        err = rel_err(out, reference(x, w, ids, tw))
        assert err < TOL[torch.bfloat16], f"replay seed {seed}: rel err {err}"


def test_executor_warms_each_distinct_layer_once(device: torch.device) -> None:
    from cluster.moe.executor import LocalExpertExecutor

    g = torch.Generator().manual_seed(0)
    same = [make_weights([0, 1], 32, 32, torch.float32, device, g) for _ in range(3)]
    other = make_weights([0, 1], 32, 64, torch.float32, device, g)  # another ffn size: warmed too
    backend = TritonMoEBackend()
    calls = []
    backend.warm_up = lambda weights, max_tokens, top_k, num_experts: calls.append((weights, max_tokens, top_k))
    LocalExpertExecutor([*same, other], 2, backend).warm_up(max_tokens=8, top_k=2)
    assert [(c[0] is w, c[1], c[2]) for c, w in zip(calls, [same[0], other])] == [(True, 8, 2)] * 2
    assert len(calls) == 2
    LocalExpertExecutor(same, 2, TorchMoEBackend()).warm_up(max_tokens=8, top_k=2)  # nothing to compile: no-op
