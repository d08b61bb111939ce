"""Build the project's C kernels for x86 CPUs (`cpu/*.c`) with the machine's C compiler, once, and load them.

All sources go into one shared library in the cache directory, under a name that hashes the sources, the flags and
the compiler, so an edit rebuilds it and concurrent processes (the expert shards) never load a half-written file.
Without AVX2 and FMA, or without a compiler, `cpu_kernel_library()` returns None and callers keep the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from cluster.checkpoint.default import cache_root

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.c"))
# -fopenmp links libgomp.so.1: torch has loaded its own copy under that name already, so both share one thread pool.
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared"]

_i64p, _f32p, _int = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "expert_ffn": [_int, _i64p, _int, _int, _f32p, _f32p, _f32p, _i64p, _f32p, _f32p, _f32p, _f32p, _f32p, _int],
    "paged_decode_attention": [_int, _int, _int, _int, _int, ctypes.c_int64, _f32p, _f32p, _f32p, _i64p,
                               ctypes.c_int64, _i64p, ctypes.c_float, _f32p, _int],
}


def cpu_supports_kernels() -> bool:
    """AVX2 with FMA, which torch's own AVX2 and AVX512 kernel levels imply."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@lru_cache(maxsize=1)
def cpu_kernel_library() -> ctypes.CDLL | None:
    if not cpu_supports_kernels():
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.warning("no C compiler found: the CPU kernels fall back to torch")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("building the CPU kernels failed, falling back to torch: %s", e)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(library, name).argtypes = argtypes
        getattr(library, name).restype = None
    return library


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), *FLAGS, version]).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent builder's file is identical
    log.info("built the CPU kernels: %s", target)
    return target
