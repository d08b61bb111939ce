"""Build the project's C kernels for x86 CPUs (`cpu/*.c`) with the machine's C compiler, once, and load them.

All sources go into one shared library in the cache directory, under a name that hashes the sources, the flags and
the compiler, so an edit rebuilds it and concurrent processes (the expert shards) never load a half-written file.
That directory must be this user's and writable by no one else (`cluster.user_cache`): a file under a predictable
name that another user could replace would be their code loaded into ours.
Without AVX2 and FMA, without a compiler, or with an unsafe cache directory, `cpu_kernel_library()` returns None
(the reason logged) and callers keep the torch path.
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

from cluster.user_cache import cache_root, private_directory

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


def find_compiler() -> str | None:
    """$CC, else gcc, else cc on the PATH."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


@lru_cache(maxsize=1)
def cpu_kernel_library() -> ctypes.CDLL | None:
    """The kernels, built once per process (and once per machine, cached); None where they cannot be used here."""
    library, _ = load_cpu_kernels()
    return library


def load_cpu_kernels() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not; logged unless the CPU just lacks AVX2/FMA). Uncached: callers want
    `cpu_kernel_library`; this is for saying why it returned None."""
    if not cpu_supports_kernels():
        return None, f"the CPU lacks AVX2/FMA (torch reports {torch.backends.cpu.get_cpu_capability()})"
    try:
        directory = private_directory(cache_root() / "kernels")
    except OSError as e:  # unsafe (UnsafeCacheError): never build into or load from it; or it cannot be created
        log.error("not building or loading the CPU kernels, falling back to torch: %s", e)
        return None, str(e)
    compiler = find_compiler()
    if compiler is None:
        log.warning("no C compiler found: the CPU kernels fall back to torch")
        return None, "no C compiler found ($CC, gcc or cc)"
    try:
        library = ctypes.CDLL(str(_build(compiler, directory)))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("building the CPU kernels failed, falling back to torch: %s", e)
        return None, f"building the CPU kernels failed: {e}"
    for name, argtypes in _SIGNATURES.items():
        getattr(library, name).argtypes = argtypes
        getattr(library, name).restype = None
    return library, ""


def _build(compiler: str, directory: Path) -> Path:
    """The shared object in `directory` (a checked private one), compiled there first if absent."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), *FLAGS, version]).encode()).hexdigest()[:16]
    target = directory / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent builder's file is identical
    log.info("built the CPU kernels: %s", target)
    return target
