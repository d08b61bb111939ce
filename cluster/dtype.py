"""The compute dtype's names and `auto`: bf16 where the hardware multiplies bf16 faster than fp32, else fp32.

- CUDA: bf16. The targets are Ampere and later, whose tensor cores take bf16; fp32 would halve what fits and
  forgo them. Nothing here calls CUDA, so a driver without a GPU can resolve for GPU workers.
- CPU with AMX tiles (Sapphire Rapids and later): bf16, which oneDNN's matmuls run on the tiles (at the cost of
  the fp32-only C kernels below; `benchmarks/dtype_auto.py` on such a CPU says whether that still pays).
- Any other CPU, AVX512-BF16 included: fp32. Without AMX a bf16 matmul gains little over fp32 and pays for
  conversions around every op, and the project's C kernels (attention decode, CPU experts) run only in fp32.
  Measured side by side in benchmarks/RESULTS.md (issue 15).
"""

from __future__ import annotations

import torch

SHORT_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_CHOICES: tuple[str, ...] = tuple(SHORT_NAMES.values())  # the names CLIs offer
DTYPES: dict[str, torch.dtype] = {
    **{short: dtype for dtype, short in SHORT_NAMES.items()},
    **{str(dtype).removeprefix("torch."): dtype for dtype in SHORT_NAMES},  # float32, bfloat16, float16
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A short ("bf16") or long ("bfloat16") name, or a supported torch.dtype, as a torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in SHORT_NAMES:
            raise ValueError(f"unsupported dtype {name}: choose {_choices()}")
        return name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}: choose {_choices()}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name ("bf16") that logs and the channel's wire spec carry."""
    if dtype not in SHORT_NAMES:
        raise ValueError(f"unsupported dtype {dtype}: choose {_choices()}")
    return SHORT_NAMES[dtype]


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """`auto` -> the faster dtype on `device` (see the module docstring); any other name -> its torch.dtype."""
    if name != "auto":
        return parse_dtype(name)
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_amx() else torch.float32
    raise ValueError(f"no auto dtype for device {device!r}: choose cpu or cuda, or name the dtype")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (every such CPU also has AMX-BF16); False where torch cannot tell."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: guard for torch versions without it
    if probe is None:
        return False
    try:
        return bool(probe())
    except RuntimeError:
        return False


def _choices() -> str:
    return ", ".join(DTYPE_CHOICES)
