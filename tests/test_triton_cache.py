"""TRITON_CACHE_DIR kept only where this process can write (cluster/kernels/triton_cache.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from cluster.kernels.triton_cache import CACHE_ENV, usable_triton_cache


def test_a_writable_cache_is_kept_and_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    wanted = tmp_path / "shared" / "triton"
    monkeypatch.setenv(CACHE_ENV, str(wanted))
    assert usable_triton_cache() == str(wanted) and wanted.is_dir()
    assert list(wanted.iterdir()) == []  # the write check leaves nothing behind


def test_an_unwritable_cache_falls_back_to_tritons_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "triton"))  # under a file: no directory can be made there
    with caplog.at_level(logging.WARNING, logger="cluster.kernels.triton_cache"):
        assert usable_triton_cache() is None
    assert CACHE_ENV not in os.environ
    assert "cannot be written" in caplog.text


def test_no_cache_set_is_left_alone(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert usable_triton_cache() is None
