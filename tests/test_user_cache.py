"""The kernel cache directory is this user's and writable by no one else, or nothing is built into or loaded from it;
and the rule that decides when the C kernel tests may skip."""

import logging
import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

import cluster.kernels.cpu_build as cpu_build
from cluster.checkpoint.default import ensure_default_checkpoint
from cluster.user_cache import UnsafeCacheError, cache_root, private_directory
from tests.conftest import cpu_kernel_skip_reason, require_cpu_kernels


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh MOE_CLUSTER_CACHE (not yet created) and an empty kernel-library cache, both restored afterwards."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MOE_CLUSTER_CACHE", str(root))
    cpu_build.cpu_kernel_library.cache_clear()
    yield root
    cpu_build.cpu_kernel_library.cache_clear()  # the next test loads from the real cache again


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every compiler run and library load instead of doing it; the CPU counts as able to run the kernels,
    so the directory check is reached on any machine."""
    calls: list[str] = []

    def build(compiler: str, directory: Path) -> Path:
        calls.append(f"build in {directory}")
        return directory / "built.so"

    def load(path: str) -> SimpleNamespace:
        calls.append(f"load {path}")
        return SimpleNamespace(**{name: SimpleNamespace() for name in cpu_build._SIGNATURES})

    monkeypatch.setattr(cpu_build, "cpu_supports_kernels", lambda: True)
    monkeypatch.setattr(cpu_build, "_build", build)
    monkeypatch.setattr(cpu_build.ctypes, "CDLL", load)
    return calls


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == cpu_build.__name__ and r.levelno == logging.ERROR]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_fresh_cache_is_created_private_and_accepted(cache):
    kernels = private_directory(cache_root() / "kernels")
    assert kernels == cache / "kernels"
    assert _mode(cache) == 0o700 and _mode(kernels) == 0o700
    assert private_directory() == cache  # the root alone, now existing


@pytest.mark.parametrize("where", ["root", "kernels"])
@pytest.mark.parametrize("mode, reason", [(0o770, "group-writable"), (0o777, "world-writable"),
                                          (0o757, "world-writable")], ids=["770", "777", "757"])
def test_a_writable_directory_is_refused_and_no_library_is_loaded(cache, no_loading, caplog, where, mode, reason):
    unsafe = cache if where == "root" else cache / "kernels"
    unsafe.mkdir(parents=True)
    cache.chmod(0o700)
    unsafe.chmod(mode)
    with pytest.raises(UnsafeCacheError, match=re.escape(f"{unsafe}: {reason}")):
        private_directory(cache / "kernels")
    with caplog.at_level(logging.ERROR, logger=cpu_build.__name__):
        assert cpu_build.cpu_kernel_library() is None
    assert no_loading == []  # neither built nor loaded
    errors = _errors(caplog)
    assert len(errors) == 1 and f"{unsafe}: {reason}" in errors[0], errors
    assert list(cache.glob("**/*.so")) == []


def test_every_directory_between_the_root_and_the_target_is_checked(cache):
    deep = private_directory(cache / "gpu-check" / "mini")
    assert [_mode(p) for p in (cache, cache / "gpu-check", deep)] == [0o700] * 3
    (cache / "gpu-check").chmod(0o775)
    with pytest.raises(UnsafeCacheError, match=re.escape(f"{cache / 'gpu-check'}: group-writable (mode 775)")):
        private_directory(deep)


def test_a_directory_of_another_user_is_refused(cache, no_loading, caplog, monkeypatch):
    private_directory(cache / "kernels")  # ours, 0o700
    monkeypatch.setattr(os, "getuid", lambda: os.stat(cache).st_uid + 1)
    with pytest.raises(UnsafeCacheError, match=re.escape(f"{cache}: owned by uid {os.stat(cache).st_uid}, not by")):
        private_directory(cache / "kernels")
    with caplog.at_level(logging.ERROR, logger=cpu_build.__name__):
        assert cpu_build.cpu_kernel_library() is None
    errors = _errors(caplog)
    assert no_loading == [] and len(errors) == 1 and "not by this user" in errors[0], errors


def test_a_private_directory_is_built_into(cache, no_loading, monkeypatch):
    monkeypatch.setattr(cpu_build, "find_compiler", lambda: "cc")
    assert cpu_build.cpu_kernel_library() is not None
    assert no_loading == [f"build in {cache / 'kernels'}", f"load {cache / 'kernels' / 'built.so'}"]
    assert _mode(cache) == _mode(cache / "kernels") == 0o700


def test_the_real_kernels_build_into_a_fresh_private_cache(cache):
    require_cpu_kernels()  # skips or fails here as the kernel suites do
    library = cpu_build.cpu_kernel_library()
    built = list((cache / "kernels").glob("cpu_kernels-*.so"))
    assert library is not None and len(built) == 1 and library._name == str(built[0])
    assert _mode(cache) == _mode(cache / "kernels") == 0o700


def test_the_default_checkpoint_is_refused_under_a_writable_root(cache):
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(UnsafeCacheError, match="world-writable"):
        ensure_default_checkpoint("tiny")
    assert list(cache.iterdir()) == []  # nothing written


def test_paths_outside_the_cache_root_are_not_taken(cache, tmp_path):
    for outside in (tmp_path / "elsewhere", cache / ".." / "elsewhere"):
        with pytest.raises(ValueError, match="not under the cache root"):
            private_directory(outside)
    assert not (tmp_path / "elsewhere").exists()


def test_a_kernel_test_fails_loudly_where_the_library_cannot_load(cache):
    """Where the rule says the kernels must run, a library that does not load fails the test with the reason."""
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(pytest.fail.Exception, match="the C kernels did not load: refusing the cache directory "
                       + re.escape(f"{cache}: world-writable")):
        require_cpu_kernels()  # skips on a machine where the kernel tests skip


@pytest.mark.parametrize("supports, compiler, in_ci, skips", [
    (False, "/usr/bin/gcc", True, True),  # no AVX2/FMA: nothing to test, in CI too
    (False, None, False, True),
    (True, None, False, True),  # a laptop without a compiler
    (True, None, True, False),  # CI without a compiler: the kernel tests run and fail
    (True, "/usr/bin/gcc", False, False),
    (True, "/usr/bin/gcc", True, False),
])
def test_the_kernel_tests_skip_only_without_avx2_or_without_a_compiler_outside_ci(supports, compiler, in_ci, skips):
    reason = cpu_kernel_skip_reason(supports, compiler, in_ci)
    assert (reason is not None) == skips, reason


def test_a_cache_that_cannot_be_created_falls_back_to_torch(cache, no_loading, caplog, monkeypatch):
    """An unwritable or missing place (a read-only container, HOME=/nonexistent) costs the C kernels, not the
    server: the MoE backend `auto` resolves to torch instead of raising."""
    from cluster.moe.backend import backend_name

    blocker = cache.parent / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MOE_CLUSTER_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.ERROR, logger=cpu_build.__name__):
        assert backend_name("auto", "cpu") == "torch"
    errors = _errors(caplog)
    assert no_loading == [] and len(errors) == 1 and str(blocker) in errors[0], errors
