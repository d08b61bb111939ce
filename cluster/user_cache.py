"""The user's cache directory (the CPU kernels' shared object, the embedded checkpoint) and the check that makes it
safe to build into and load from.

A shared object under a predictable name in a directory someone else can write is their code running in this
process: they replace the file, we `dlopen` it. So every directory under the cache root that the project writes or
reads must belong to this user and be writable by no one else, and the cache root with it (whoever can write the
root can rename a checked directory away and put their own in its place). Directories this module creates are 0o700.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeCacheError(PermissionError):
    """A cache directory that another user owns or can write."""


def cache_root() -> Path:
    """`$MOE_CLUSTER_CACHE`, else ~/.cache/moe-cluster. Not created or checked here: see `private_directory`."""
    return Path(os.environ.get("MOE_CLUSTER_CACHE", Path.home() / ".cache" / "moe-cluster")).absolute()


def private_directory(path: Path | str | None = None) -> Path:
    """`path` (the cache root when None), a directory at or under the cache root, created 0o700 where missing, with
    every directory from the root down to it checked: owned by this user, not group- or world-writable.

    Raises UnsafeCacheError naming the directory and the reason; ValueError for a path outside the cache root.
    """
    root = cache_root()
    target = root if path is None else Path(path).absolute()
    if (target != root and root not in target.parents) or ".." in target.parts:
        raise ValueError(f"{target} is not under the cache root {root}")
    root.parent.mkdir(parents=True, exist_ok=True)  # ~/.cache and above: not ours to check or to restrict
    parts = target.relative_to(root).parts
    for directory in [root, *(root.joinpath(*parts[:i]) for i in range(1, len(parts) + 1))]:
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass  # an existing one (or a concurrent process's) is checked like ours
        _check_private(directory)
    return target


def _check_private(directory: Path) -> None:
    """Raise UnsafeCacheError unless `directory` is a directory this user owns that no one else can write."""
    st = os.stat(directory)
    problem = _problem(st.st_mode, st.st_uid, os.getuid())
    if problem:
        raise UnsafeCacheError(f"refusing the cache directory {directory}: {problem}; it must be this user's and "
                               f"writable by no one else (`chmod 700` it, or set MOE_CLUSTER_CACHE elsewhere)")


def _problem(mode: int, owner: int, uid: int) -> str | None:
    if not stat.S_ISDIR(mode):
        return "not a directory"
    if owner != uid:
        return f"owned by uid {owner}, not by this user (uid {uid})"
    if mode & stat.S_IWOTH:
        return f"world-writable (mode {stat.S_IMODE(mode):o})"
    if mode & stat.S_IWGRP:
        return f"group-writable (mode {stat.S_IMODE(mode):o})"
    return None
