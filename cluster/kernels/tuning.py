"""Block configs for the fused-MoE kernels, chosen by token count M.

Tuned configs live in `configs/E=<E>,N=<N>,device=<name>,triton=<major.minor>.json` (E = local experts, N = ffn
size F, name = `torch.cuda.get_device_name()` with spaces as underscores), mapping M (tokens, as a string) to either
one flat config used by both kernels or `{"gate_up": {...}, "down": {...}}`; the nearest M is used.
`benchmarks/tune_moe.py` writes them. The Triton version is part of the key because the best blocks (and whether a
block fits in shared memory at all) move with the compiler's pipelining. Lookup: this Triton's file, else the same
shape and device tuned under the nearest other Triton version (tuned for this GPU and shape, so likely nearer the
best than the generic defaults; warm-up compiles every one before serving, so one that no longer fits fails at
start, not mid-request), else an unversioned file, else `default_config`.

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


def parse_config(obj: dict) -> MoEConfig:
    """A JSON entry: one flat KernelConfig dict for both kernels, or {"gate_up": {...}, "down": {...}}."""
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


def config_file_name(num_experts: int, ffn: int, device: str, triton: str | None = None) -> str:
    """The tuned-config file for this shape, device and Triton version (default: the installed one)."""
    return f"E={num_experts},N={ffn},device={device.replace(' ', '_')},triton={triton or triton_version()}.json"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def find_config_file(num_experts: int, ffn: int, device: str, triton: str | None = None) -> Path | None:
    """This Triton's file; else the nearest other version's (the newer on a tie); else the unversioned one."""
    triton = triton or triton_version()
    stem = f"E={num_experts},N={ffn},device={device.replace(' ', '_')}"
    exact = CONFIG_DIR / config_file_name(num_experts, ffn, device, triton)
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
    legacy = CONFIG_DIR / f"{stem}.json"
    return legacy if legacy.is_file() else None


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Version distance, major first: 3.5 is nearer 3.6 than 4.6 is."""
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return tuple(abs(x - y) for x, y in zip(a, b))


@lru_cache(maxsize=None)
def load_configs(num_experts: int, ffn: int, device: str) -> dict[int, MoEConfig] | None:
    """Tuned configs {M: MoEConfig} for this shape and device (see `find_config_file`), or None if there is none."""
    path = find_config_file(num_experts, ffn, device)
    if path is None:
        return None
    return {int(m): parse_config(c) for m, c in json.loads(path.read_text()).items()}


def default_config(m: int, dtype: torch.dtype = torch.bfloat16, fp8_weights: bool = False) -> MoEConfig:
    """Untuned defaults by token count M (bandwidth-bound small M: small BLOCK_M, long K tiles) and dtype: fp32
    tiles hold twice the bytes, so past M = 32 they are smaller (the 16-bit ones spill registers in fp32 on sm_90,
    `benchmarks/compile_check.py`). FP8 weights widened to fp32 pass through registers on their way to the dot, so
    their K tiles are halved again (they spill otherwise)."""
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
    if m <= 256:
        return MoEConfig(KernelConfig(32, 128, 64, 8, 4, 4), KernelConfig(32, 64, 64, 8, 4, 4))
    if m <= 1024:
        return MoEConfig(KernelConfig(64, 128, 64, 8, 4, 4), KernelConfig(64, 128, 64, 8, 4, 4))
    return MoEConfig(KernelConfig(128, 128, 64, 8, 8, 3), KernelConfig(128, 128, 64, 8, 8, 3))


def _halve_k(cfg: KernelConfig) -> KernelConfig:
    return replace(cfg, BLOCK_K=cfg.BLOCK_K // 2)


def get_config(m: int, num_experts: int, ffn: int, device: torch.device | str,
               dtype: torch.dtype = torch.bfloat16, fp8_weights: bool = False) -> MoEConfig:
    """Config for M tokens on a shard of `num_experts` local experts with ffn size `ffn`, computing in `dtype`: the
    tuned entry with the nearest M if a config file exists for this device (tuned for the 16-bit serving dtypes:
    fp32 always takes its defaults), else `default_config`."""
    name = device_name(device)
    table = None if name == "interpreter" or dtype == torch.float32 else load_configs(num_experts, ffn, name)
    if not table:
        return default_config(m, dtype, fp8_weights)
    return table[min(table, key=lambda k: (abs(k - m), k))]


def config_buckets(max_tokens: int, num_experts: int, ffn: int, device: torch.device | str,
                   dtype: torch.dtype = torch.bfloat16, fp8_weights: bool = False) -> list[tuple[int, int, MoEConfig]]:
    """The M buckets up to `max_tokens`: (first M, last M, config) for each run of token counts with one config."""
    buckets: list[tuple[int, int, MoEConfig]] = []
    for m in range(1, max_tokens + 1):
        cfg = get_config(m, num_experts, ffn, device, dtype, fp8_weights)
        if buckets and buckets[-1][2] == cfg:
            buckets[-1] = (buckets[-1][0], m, cfg)
        else:
            buckets.append((m, m, cfg))
    return buckets
