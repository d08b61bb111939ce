"""The embedded default checkpoint: written once into a cache directory, reused afterwards."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from cluster.checkpoint.presets import preset
from cluster.checkpoint.writer import write_random_checkpoint

DEFAULT_PRESET = "mini"


def cache_root() -> Path:
    return Path(os.environ.get("MOE_CLUSTER_CACHE", Path.home() / ".cache" / "moe-cluster"))


def ensure_default_checkpoint(name: str = DEFAULT_PRESET, seed: int = 0) -> Path:
    """The path of the `name` preset checkpoint, written there first if absent (atomically, by rename)."""
    target = cache_root() / f"{name}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing the embedded {name} checkpoint to {target} (first run only)", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_random_checkpoint(tmp, preset(name), seed=seed)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
