"""Block configs for the fused-MoE kernels, chosen by token count M.

Tuned configs live in `configs/E=<E>,N=<N>,device=<name>.json` (E = local experts, N = ffn size F, name =
`torch.cuda.get_device_name()` with spaces as underscores), mapping M (tokens, as a string) to either one flat
config used by both kernels or `{"gate_up": {...}, "down": {...}}`; the nearest M is used. `benchmarks/tune_moe.py`
writes them. Without a file, `default_config` applies.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


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


def config_file_name(num_experts: int, ffn: int, device: str) -> str:
    return f"E={num_experts},N={ffn},device={device.replace(' ', '_')}.json"


@lru_cache(maxsize=None)
def load_configs(num_experts: int, ffn: int, device: str) -> dict[int, MoEConfig] | None:
    """Tuned configs {M: MoEConfig} for this shape and device, or None if there is no file."""
    path = CONFIG_DIR / config_file_name(num_experts, ffn, device)
    if not path.is_file():
        return None
    return {int(m): parse_config(c) for m, c in json.loads(path.read_text()).items()}


def default_config(m: int) -> MoEConfig:
    """Untuned defaults by token count M (bandwidth-bound small M: small BLOCK_M, long K tiles)."""
    if interpreting():  # block sizes >= 32: the interpreter runs each program in Python, few big ones are faster
        return MoEConfig(KernelConfig(32, 128, 64, 1), KernelConfig(32, 64, 64, 1))
    if m <= 32:
        return MoEConfig(KernelConfig(16, 64, 128, 1, 4, 4), KernelConfig(16, 32, 128, 1, 4, 4))
    if m <= 256:
        return MoEConfig(KernelConfig(32, 128, 64, 8, 4, 4), KernelConfig(32, 64, 64, 8, 4, 4))
    if m <= 1024:
        return MoEConfig(KernelConfig(64, 128, 64, 8, 4, 4), KernelConfig(64, 128, 64, 8, 4, 4))
    return MoEConfig(KernelConfig(128, 128, 64, 8, 8, 3), KernelConfig(128, 128, 64, 8, 8, 3))


def get_config(m: int, num_experts: int, ffn: int, device: torch.device | str) -> MoEConfig:
    """Config for M tokens on a shard of `num_experts` local experts with ffn size `ffn`: the tuned entry with the
    nearest M if a config file exists for this device, else `default_config`."""
    name = device_name(device)
    table = None if name == "interpreter" else load_configs(num_experts, ffn, name)
    if not table:
        return default_config(m)
    return table[min(table, key=lambda k: (abs(k - m), k))]
