"""Block configs for the fused-MoE kernels, chosen by token count M.

Tuned configs live in `configs/E=<E>,N=<N>,device=<name>,dtype=<dtype>,triton=<major.minor>.json` (E = local
experts, N = ffn size F, name = `torch.cuda.get_device_name()` with spaces as underscores, dtype = `dtype_key`: the
compute dtype, `fp8_`-prefixed for FP8 weights), mapping M (tokens, as a string) to one flat config used by both
kernels, `{"gate_up": {...}, "down": {...}}`, or "default" (`default_config` at that M: the tuner found nothing
faster by its margin); the nearest M is used. `benchmarks/tune_moe.py` writes them. The Triton version is part of the
key because the best blocks (and whether a block fits in shared memory at all) move with the compiler's pipelining.
Lookup: this dtype's file under this Triton, else under the nearest other Triton version (tuned for this GPU and
shape, so likely nearer the best than the generic defaults; warm-up compiles every one before serving, so one that
no longer fits fails at start, not mid-request), else an unversioned one; then the same for the names written
before the dtype was in the key (any dtype but fp32, which never took those 16-bit tables); else `default_config`.

M buckets: a bucket is a run of token counts that get the same config (with a table, the Ms nearest each tuned
entry; without one, `default_config`'s ranges). The kernels compile once per distinct config (block sizes are
constexpr), so running one M of each bucket compiles everything serving can launch (`config_buckets`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT = "default"  # a table entry that defers to `default_config`
SMEM_LIMIT = 220 * 1024  # shared memory a config may plan for on H100/H200-class GPUs (227 KiB per block)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelConfig:
    """Launch config of one kernel. For gate_up, BLOCK_N counts gate + up columns (BLOCK_N // 2 of each)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEConfig:
    """Configs of both kernels; they share BLOCK_M, the granularity `align_pairs` pads to."""

    gate_up: KernelConfig
    down: KernelConfig

    def __post_init__(self) -> None:
        if self.gate_up.BLOCK_M != self.down.BLOCK_M:
            raise ValueError(f"gate_up and down must share BLOCK_M: {self.gate_up.BLOCK_M} != {self.down.BLOCK_M}")
        if self.gate_up.BLOCK_N % 32:
            raise ValueError(f"gate_up BLOCK_N must be a multiple of 32 (two halves >= 16), got {self.gate_up.BLOCK_N}")

    @property
    def block_m(self) -> int:
        return self.gate_up.BLOCK_M

    def to_json(self) -> dict:
        return {"gate_up": asdict(self.gate_up), "down": asdict(self.down)}


def parse_config(obj: dict | str) -> MoEConfig | None:
    """A JSON entry: one flat KernelConfig dict for both kernels, {"gate_up": {...}, "down": {...}}, or "default"
    (-> None: `default_config` decides)."""
    if obj == DEFAULT:
        return None
    if "gate_up" in obj:
        return MoEConfig(KernelConfig(**obj["gate_up"]), KernelConfig(**obj["down"]))
    cfg = KernelConfig(**obj)
    return MoEConfig(cfg, cfg)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return "interpreter"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def triton_version() -> str:
    """The installed Triton as "major.minor" (what the config key records)."""
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def dtype_key(dtype: torch.dtype, fp8_weights: bool = False) -> str:
    """The dtype part of a config file's name: the compute dtype ("bf16"), "fp8_"-prefixed for FP8 weights."""
    from cluster.dtype import dtype_name

    return ("fp8_" if fp8_weights else "") + dtype_name(dtype)


def config_file_name(num_experts: int, ffn: int, device: str, triton: str | None = None, *,
                     dtype: str | None = None) -> str:
    """The tuned-config file for this shape, device, dtype (a `dtype_key`; None: the name from before the dtype was
    in the key) and Triton version (default: the installed one)."""
    return f"{_stem(num_experts, ffn, device, dtype)},triton={triton or triton_version()}.json"


def _stem(num_experts: int, ffn: int, device: str, dtype: str | None) -> str:
    return f"E={num_experts},N={ffn},device={device.replace(' ', '_')}" + (f",dtype={dtype}" if dtype else "")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def find_config_file(num_experts: int, ffn: int, device: str, triton: str | None = None,
                     dtype: str | None = None) -> Path | None:
    """For `dtype`'s name, then (unless dtype is fp32's) the dtype-less one: this Triton's file; else the nearest
    other version's (the newer on a tie); else the unversioned one."""
    triton = triton or triton_version()
    keys = [dtype] if dtype else []
    if dtype is None or not dtype.endswith("fp32"):
        keys.append(None)
    for key in keys:
        path = _find_versioned(_stem(num_experts, ffn, device, key), triton)
        if path is not None:
            return path
    return None


def _find_versioned(stem: str, triton: str) -> Path | None:
    exact = CONFIG_DIR / f"{stem},triton={triton}.json"
    if exact.is_file():
        return exact
    pattern = re.compile(re.escape(stem) + r",triton=(\d+(?:\.\d+)*)\.json")
    versions = {m.group(1): path for path in CONFIG_DIR.glob(f"{stem},triton=*.json")
                if (m := pattern.fullmatch(path.name))}
    if versions:
        want = _version_key(triton)
        pick = min(versions, key=lambda v: (_distance(_version_key(v), want), [-x for x in _version_key(v)]))
        log.warning("no MoE configs tuned under Triton %s for %s; using Triton %s's", triton, stem, pick)
        return versions[pick]
    unversioned = CONFIG_DIR / f"{stem}.json"
    return unversioned if unversioned.is_file() else None


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Version distance, major first: 3.5 is nearer 3.6 than 4.6 is."""
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return tuple(abs(x - y) for x, y in zip(a, b))


@lru_cache(maxsize=None)
def load_configs(num_experts: int, ffn: int, device: str,
                 dtype: str | None = None) -> dict[int, MoEConfig | None] | None:
    """Tuned configs {M: MoEConfig, or None for "default"} for this shape, device and `dtype_key` (see
    `find_config_file`), or None if there is no file."""
    path = find_config_file(num_experts, ffn, device, dtype=dtype)
    if path is None:
        return None
    return {int(m): parse_config(c) for m, c in json.loads(path.read_text()).items()}


def smem_bytes(cfg: KernelConfig, itemsize: int = 2) -> int:
    """Shared memory a config's pipeline plans for: per stage an activation tile and a weight tile (gate_up's gate
    and up halves together are BLOCK_N wide) of `itemsize`-byte elements."""
    return cfg.num_stages * (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K * itemsize


def device_smem(device: torch.device | str) -> int | None:
    """Shared memory one block may opt into on this CUDA device; None off CUDA (or under the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting() or not torch.cuda.is_available():
        return None
    return _cuda_smem(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _cuda_smem(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


def default_config(m: int, dtype: torch.dtype = torch.bfloat16, fp8_weights: bool = False,
                   smem: int | None = None) -> MoEConfig:
    """Untuned defaults by token count M (bandwidth-bound small M: small BLOCK_M, long K tiles) and dtype: fp32
    tiles hold twice the bytes, so past M = 32 they are smaller (the 16-bit ones spill registers in fp32 on sm_90,
    `benchmarks/compile_check.py`). FP8 weights widened to fp32 pass through registers on their way to the dot, so
    their K tiles are halved again (they spill otherwise). From M = 256 the 16-bit tiles grow where the GPU gives a
    block `smem` bytes of shared memory enough for them (None: assume it does, as an H100 or H200 does); elsewhere
    (A100, Ada) the mid-size ones carry on."""
    if interpreting():  # block sizes >= 32: the interpreter runs each program in Python, few big ones are faster
        return MoEConfig(KernelConfig(32, 128, 64, 1), KernelConfig(32, 64, 64, 1))
    if dtype == torch.float32 and fp8_weights:
        cfg = default_config(m, dtype)
        return MoEConfig(_halve_k(cfg.gate_up), _halve_k(cfg.down))
    if m <= 32:
        return MoEConfig(KernelConfig(16, 64, 128, 1, 4, 4), KernelConfig(16, 32, 128, 1, 4, 4))
    if dtype == torch.float32:
        if m <= 256:
            return MoEConfig(KernelConfig(32, 128, 64, 8, 8, 4), KernelConfig(32, 64, 64, 8, 4, 4))
        return MoEConfig(KernelConfig(64, 64, 64, 8, 8, 3), KernelConfig(64, 64, 64, 8, 8, 3))
    large = _large_tiles(m)
    if large is not None and (smem is None or smem >= LARGE_TILES_SMEM):
        return MoEConfig(large, large)
    if m <= 256:
        return MoEConfig(KernelConfig(32, 128, 64, 8, 4, 4), KernelConfig(32, 64, 64, 8, 4, 4))
    if m <= 1024:
        return MoEConfig(KernelConfig(64, 128, 64, 8, 4, 4), KernelConfig(64, 128, 64, 8, 4, 4))
    return MoEConfig(KernelConfig(128, 128, 64, 8, 8, 3), KernelConfig(128, 128, 64, 8, 8, 3))


# 16-bit tiles from M = 256, one for both kernels: those of vLLM's published bf16 fused-MoE table for Mixtral's experts
# on an H100 (vllm/model_executor/layers/fused_moe/configs/E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json, its
# entries 256, 512 and 1024 up to 4096), where one tile also serves both GEMMs and BLOCK_N spans the gate and up
# columns together, as our gate_up's does. GROUP_M stays ours; num_warps is 8 at 512 (with vLLM's 4, the [64, 256]
# fp32 accumulators leave our gate_up at the 255-register cap, spilling in fp16 W8A16 on sm_90: compile_check).
LARGE_TILES = ((256, KernelConfig(64, 128, 128, 8, 4, 4)), (512, KernelConfig(64, 256, 64, 8, 8, 4)),
               (1024, KernelConfig(128, 256, 64, 8, 8, 4)))
LARGE_TILES_SMEM = max(smem_bytes(cfg) for _, cfg in LARGE_TILES)  # <= SMEM_LIMIT (a test checks)


def _large_tiles(m: int) -> KernelConfig | None:
    found = None
    for first_m, cfg in LARGE_TILES:
        if m >= first_m:
            found = cfg
    return found


def _halve_k(cfg: KernelConfig) -> KernelConfig:
    return replace(cfg, BLOCK_K=cfg.BLOCK_K // 2)


def get_config(m: int, num_experts: int, ffn: int, device: torch.device | str,
               dtype: torch.dtype = torch.bfloat16, fp8_weights: bool = False,
               smem: int | None = None) -> MoEConfig:
    """Config for M tokens on a shard of `num_experts` local experts with ffn size `ffn`, computing in `dtype` (FP8
    weights or not): the tuned entry with the nearest M if a config file exists for this device and dtype (see
    `find_config_file`), else `default_config` for the device's shared memory (`smem` overrides it: a compile for
    another GPU)."""
    name = device_name(device)
    table = None if name == "interpreter" else load_configs(num_experts, ffn, name, dtype_key(dtype, fp8_weights))
    cfg = table[min(table, key=lambda k: (abs(k - m), k))] if table else None
    return cfg or default_config(m, dtype, fp8_weights, device_smem(device) if smem is None else smem)


def config_buckets(max_tokens: int, num_experts: int, ffn: int, device: torch.device | str,
                   dtype: torch.dtype = torch.bfloat16, fp8_weights: bool = False,
                   smem: int | None = None) -> list[tuple[int, int, MoEConfig]]:
    """The M buckets up to `max_tokens`: (first M, last M, config) for each run of token counts with one config."""
    buckets: list[tuple[int, int, MoEConfig]] = []
    for m in range(1, max_tokens + 1):
        cfg = get_config(m, num_experts, ffn, device, dtype, fp8_weights, smem)
        if buckets and buckets[-1][2] == cfg:
            buckets[-1] = (buckets[-1][0], m, cfg)
        else:
            buckets.append((m, m, cfg))
    return buckets
