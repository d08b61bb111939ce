import dataclasses
import os
from pathlib import Path

import pytest
import torch

from cluster.checkpoint.presets import preset
from cluster.checkpoint.writer import write_random_checkpoint

# Triton kernels run under the interpreter on machines without a GPU; this must be set before any kernel is defined
# (no module imported above defines one).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernel tests run where the kernels would: compiled on a GPU when there is one, else under the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for every test that needs it (logical CPUs above the cores: the actors are mostly idle)."""
    import shutil
    import tempfile

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start the local Ray carry the `ray` marker: `pytest -m "not ray"` runs the fast rest."""
    for item in items:
        if "local_ray" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
