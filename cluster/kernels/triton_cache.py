"""Where Triton keeps compiled kernels: `TRITON_CACHE_DIR` when this process can write there (on Kubernetes a volume
shared by the GPU pods, so a new pod's unit finds the kernels compiled before), else Triton's own default."""

from __future__ import annotations

import logging
import os
import tempfile

log = logging.getLogger(__name__)

CACHE_ENV = "TRITON_CACHE_DIR"


def usable_triton_cache() -> str | None:
    """Keep `TRITON_CACHE_DIR` if a file can be written in it (created if missing); else drop it, with a warning,
    so that the process compiles into Triton's default directory instead of failing at its first kernel (a shared
    volume this user may not write, for one). -> the directory kept, or None."""
    path = os.environ.get(CACHE_ENV)
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        log.warning("%s=%r cannot be written (%s): Triton compiles into its default directory instead", CACHE_ENV,
                    path, e)
        del os.environ[CACHE_ENV]
        return None
    return path
