"""Reads HF-layout safetensors checkpoints (single file or sharded with an index), memory-mapped."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from cluster.checkpoint.progress import ProgressCallback, default_progress

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_FP8_NAMES = {"F8_E4M3", "F8_E5M2"}  # safetensors' names of the 8-bit floats
FP8_STORED = "F8_E4M3"  # the FP8 a checkpoint may hold (float8_e4m3fn, as vLLM's fp8 checkpoints store it)


class StoredTensor(NamedTuple):
    dtype: str  # safetensors' name, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _DTYPE_BYTES.get(self.dtype, 2) * _numel(list(self.shape))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as asked; the message names the file or tensor."""


class CheckpointReader:
    """Maps tensor names to safetensors files; loads chosen tensors with shape checks, counting bytes read."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        self.weight_map = self._read_weight_map()
        self.bytes_loaded = 0

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
            for file in sorted(set(weight_map.values())):
                if not (self.directory / file).is_file():
                    raise CheckpointError(f"{index} names shard {file}, which is not in {self.directory}")
            return dict(weight_map)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in {self.directory}")
        weight_map = {}
        for file in files:
            for name in self._open_keys(file):
                weight_map[name] = file.name
        return weight_map

    def _open_keys(self, file: Path) -> list[str]:
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read safetensors file {file}: {e}") from e

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def stored_nbytes(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Bytes these tensors occupy in the files (from the headers; nothing is read)."""
        total = 0
        with ExitStack() as stack:
            handles: dict[str, Any] = {}
            for name in shapes:
                s = self._slice(stack, handles, name)
                total += _DTYPE_BYTES.get(s.get_dtype(), 2) * _numel(s.get_shape())
        return total

    def stored(self, names: list[str]) -> dict[str, StoredTensor]:
        """How each named tensor is stored (from the headers; nothing is read)."""
        out = {}
        with ExitStack() as stack:
            handles: dict[str, Any] = {}
            for name in names:
                s = self._slice(stack, handles, name)
                out[name] = StoredTensor(s.get_dtype(), tuple(s.get_shape()))
        return out

    def load(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device | str = "cpu",
             progress: ProgressCallback | None = None, label: str = "loading checkpoint") -> dict[str, torch.Tensor]:
        """Load exactly the named tensors, checking each shape, cast to `dtype` on `device`.

        Tensors are read file by file through memory maps; `bytes_loaded` grows by the stored size of each. FP8 is
        read only as FP8 (its values mean nothing without their scales) and nothing else is cast to FP8.
        """
        total = self.stored_nbytes(shapes)
        progress = progress or default_progress(label, total)
        out: dict[str, torch.Tensor] = {}
        done = 0
        with ExitStack() as stack:
            handles: dict[str, Any] = {}
            for name in sorted(shapes, key=lambda n: (self.weight_map.get(n, ""), n)):
                stored = self._slice(stack, handles, name)
                got = tuple(stored.get_shape())
                if got != tuple(shapes[name]):
                    raise CheckpointError(f"tensor {name} has shape {list(got)} in {self.weight_map[name]}, "
                                          f"expected {list(shapes[name])}")
                _check_fp8(name, stored.get_dtype(), dtype)
                tensor = handles[self.weight_map[name]].get_tensor(name)
                nbytes = tensor.numel() * tensor.element_size()
                out[name] = tensor.to(device=device, dtype=dtype)
                done += nbytes
                self.bytes_loaded += nbytes
                if progress:
                    progress(done, total)
        return out

    def _slice(self, stack: ExitStack, handles: dict[str, Any], name: str) -> Any:
        f = self._handle(stack, handles, name)
        try:
            return f.get_slice(name)
        except Exception as e:
            raise CheckpointError(f"tensor {name} is missing from {self.weight_map[name]} "
                                  f"(the index lists it there)") from e

    def _handle(self, stack: ExitStack, handles: dict[str, Any], name: str) -> Any:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.directory}")
        if file not in handles:
            try:
                handles[file] = stack.enter_context(safe_open(self.directory / file, framework="pt"))
            except Exception as e:
                raise CheckpointError(f"cannot open safetensors file {self.directory / file}: {e}") from e
        return handles[file]


def _check_fp8(name: str, stored: str, dtype: torch.dtype) -> None:
    fp8_wanted = dtype.itemsize == 1 and dtype.is_floating_point
    if (stored in _FP8_NAMES) != fp8_wanted or (fp8_wanted and stored != FP8_STORED):
        raise CheckpointError(f"tensor {name} is stored as {stored} and was asked for as {dtype}: FP8 weights are "
                              f"read as {FP8_STORED}, with their weight_scale (the checkpoint's config.json must "
                              "declare quantization_config.quant_method fp8)")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
