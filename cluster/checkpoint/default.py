"""The embedded default checkpoint: written once into the user's cache directory, reused afterwards.

Only under a checked cache root (`cluster.user_cache`): a root another user can write could hand us their weights.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from cluster.checkpoint.presets import preset
from cluster.checkpoint.writer import write_random_checkpoint
from cluster.user_cache import private_directory

DEFAULT_PRESET = "mini"

log = logging.getLogger(__name__)


def ensure_default_checkpoint(name: str = DEFAULT_PRESET, seed: int = 0) -> Path:
    """The path of the `name` preset checkpoint, written there first if absent (atomically, by rename).

    Raises UnsafeCacheError where the cache root is another user's or writable by others."""
    target = private_directory() / f"{name}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    log.info("writing the embedded %s checkpoint to %s (first run only)", name, target)
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
