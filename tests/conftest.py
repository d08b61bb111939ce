import dataclasses
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.checkpoint.presets import preset
from cluster.checkpoint.writer import write_random_checkpoint
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.kernels.cpu_build import cpu_kernel_library, cpu_supports_kernels, find_compiler, load_cpu_kernels
from cluster.model.loader import load_model

# Imported where used: the tokenizer (mistral-common) and the grammar engine (llguidance), which the GPU machine
# lacks, so the kernel test files collect there (benchmarks/gpu_check.py's kernel_tests).

# Triton kernels run under the interpreter on machines without a GPU; this must be set before any kernel is defined
# (no module imported above defines one).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernel tests run where the kernels would: compiled on a GPU when there is one, else under the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    """Every test starts from the same global random state (seed 0), so it reproduces alone as in the suite; tests
    that draw their inputs use their own seeded generators on top of this."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """The device kernel and attention tests build their tensors on (see KERNEL_DEVICE)."""
    return KERNEL_DEVICE


# A Mistral-7B-shaped (dense, v1 tokenizer) config small enough for tests.
TINY_DENSE = dataclasses.replace(preset("tiny"), vocab_size=32000, num_experts=0, experts_per_token=0,
                                 tokenizer_version="v1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset, one safetensors file, seed 0. Shared: a test that damages a checkpoint writes its own."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), preset("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_dense"), TINY_DENSE, seed=1)


@pytest.fixture(scope="module")
def model(tiny_dir):
    """The tiny checkpoint's model in fp32 (experts on a local executor), shared by a module's engines."""
    return load_model(tiny_dir, "fp32").model


@pytest.fixture(scope="module")
def tok():
    from cluster.tokenizer import load_tokenizer  # (mistral-common: see "Imported where used" above)

    return load_tokenizer("v3")


def grammar_guide(tokenizer_version: str):
    from cluster.engine.guided import GrammarGuide  # (llguidance: see "Imported where used" above)

    return GrammarGuide.for_tokenizer(tokenizer_version)


@pytest.fixture
def async_scheduling() -> bool | None:
    """`EngineConfig.async_scheduling` of the engines `make_engine` builds (None: the device's default). A module
    marked `both_schedulings` runs each test twice, with it off and on (`pytest_generate_tests`)."""
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "async_scheduling" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_schedulings"):
        metafunc.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


@pytest.fixture
def make_engine(model, tok, async_scheduling):
    """Engines built here are checked after the test: every block back on the free list, nothing referenced."""
    engines = []

    def make(blocks: int = 256, guided: bool = False, **kw) -> LLMEngine:
        kw.setdefault("async_scheduling", async_scheduling)
        block_bytes = kv_bytes_per_block(model.config, 16, torch.float32)
        guide = grammar_guide(tok.version) if guided else None
        engine = LLMEngine(model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=blocks * block_bytes, **kw),
                           guide)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert not engine.has_work() and not engine.requests
        assert engine.blocks.num_free == engine.blocks.num_blocks
        assert all(b.ref_count == 0 for b in engine.blocks.blocks)
        assert engine.guide is None or engine.guide.active == 0  # every guided sequence's matcher released


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for every test that needs it (logical CPUs above the cores: the actors are mostly idle)."""
    import shutil
    import tempfile

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    # Metrics reach the node's metrics agent every second (Ray's floor; its default is 10 s), so the metrics tests
    # see their traffic quickly.
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False,
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def cpu_kernel_skip_reason(supports_kernels: bool, compiler: str | None, in_ci: bool) -> str | None:
    """Why the C kernel tests may skip here, or None: they must run, and fail if the kernels do not load. Only a CPU
    without AVX2/FMA excuses them, or a machine without a C compiler outside CI (where a compiler must exist)."""
    if not supports_kernels:
        return "the C kernels need an x86 CPU with AVX2 and FMA"
    if compiler is None and not in_ci:
        return "no C compiler ($CC, gcc or cc) to build the C kernels (in CI this is a failure)"
    return None


def require_cpu_kernels() -> None:
    """Skip per `cpu_kernel_skip_reason` on this machine, else fail unless the C kernels load."""
    reason = cpu_kernel_skip_reason(cpu_supports_kernels(), find_compiler(), bool(os.environ.get("CI")))
    if reason is not None:
        pytest.skip(reason)
    if cpu_kernel_library() is None:
        pytest.fail(f"the C kernels did not load: {load_cpu_kernels()[1]}", pytrace=False)


@pytest.fixture(autouse=True)
def _cpu_kernels_rule(request: pytest.FixtureRequest) -> None:
    """Tests marked `cpu_kernels` run under `require_cpu_kernels` (one rule for every kernel suite)."""
    if request.node.get_closest_marker("cpu_kernels") is not None:
        require_cpu_kernels()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that starts the local Ray (the fixture, however deep) gets the `ray` and `e2e` markers here; tests
    that start a server, a CLI or a benchmark process carry `e2e` themselves. `pytest -m "not e2e"`: the fast rest."""
    for item in items:
        if "local_ray" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session (tests/postgres.py), as the URL of an empty database. Without
    the server binaries the tests skip, except in CI, where that is a failure (.ci/run installs them)."""
    from tests.postgres import find_postgres_bin, postgres_server

    if find_postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("no PostgreSQL server binaries (initdb, pg_ctl, postgres); CI must install them",
                        pytrace=False)
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres; in CI this is a failure)")
    with postgres_server() as url:
        yield url
