"""cluster.dtype: every name parses, bad ones name the choices, and `auto` follows the device (and, on CPU, AMX)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cluster.dtype as dtypes
from cluster.dtype import DTYPE_CHOICES, dtype_name, parse_dtype, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
         "fp16": torch.float16, "float16": torch.float16}


@pytest.mark.parametrize("name, want", NAMES.items())
def test_parse_dtype_takes_every_name(name, want):
    assert parse_dtype(name) is want
    assert parse_dtype(want) is want
    assert parse_dtype(dtype_name(want)) is want


@pytest.mark.parametrize("bad", ["int8", "auto", "BF16", "", torch.int8])
def test_parse_dtype_names_the_choices(bad):
    with pytest.raises(ValueError, match="unsupported dtype .*choose fp32, bf16, fp16"):
        parse_dtype(bad)


def test_dtype_name_is_the_short_name():
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == list(DTYPE_CHOICES)
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        dtype_name(torch.float64)


@pytest.mark.parametrize("device", ["cpu", "cuda", torch.device("cpu")])
@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "bfloat16"])
def test_explicit_names_pass_through_as_torch_dtypes(monkeypatch, device, name):
    monkeypatch.setattr(dtypes, "cpu_has_amx", _must_not_probe)
    assert resolve_dtype(name, device) is NAMES[name]


def test_explicit_bad_name_raises():
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", "cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_auto_on_cuda_is_bf16_without_touching_cuda(monkeypatch, device):
    """The Ray driver on a CPU head resolves for GPU workers: no CUDA call, no CPU probe."""
    for fn in ("is_available", "is_bf16_supported", "get_device_capability", "get_device_properties",
               "device_count", "init"):
        monkeypatch.setattr(torch.cuda, fn, _must_not_probe)
    monkeypatch.setattr(dtypes, "cpu_has_amx", _must_not_probe)
    assert resolve_dtype("auto", device) is torch.bfloat16


@pytest.mark.parametrize("amx, want", [(True, torch.bfloat16), (False, torch.float32)], ids=["amx", "no-amx"])
def test_auto_on_cpu_follows_the_amx_probe(monkeypatch, amx, want):
    monkeypatch.setattr(dtypes, "cpu_has_amx", lambda: amx)  # both branches, whatever this machine's CPU is
    assert resolve_dtype("auto", "cpu") is want
    assert resolve_dtype("auto", torch.device("cpu")) is want


@pytest.mark.parametrize("tiles, want", [(True, True), (False, False)])
def test_amx_probe_reads_torch(monkeypatch, tiles, want):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: tiles, raising=False)
    assert dtypes.cpu_has_amx() is want


def test_amx_probe_without_torch_support_says_no(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert dtypes.cpu_has_amx() is False


def test_auto_on_another_device_raises():
    with pytest.raises(ValueError, match="no auto dtype for device 'meta'"):
        resolve_dtype("auto", "meta")


def _must_not_probe(*args, **kwargs):
    raise AssertionError("resolve_dtype probed hardware it did not need")


def _benchmark():
    spec = importlib.util.spec_from_file_location("dtype_auto", ROOT / "benchmarks" / "dtype_auto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("auto, want", [("fp32", [64]), ("bf16", [1])])
def test_benchmark_verdict_names_the_levels_where_auto_is_slower(auto, want):
    ratios = {1: 2.2, 64: 0.8}  # fp32/bf16 tokens/s: fp32 wins at c=1, bf16 at c=64
    assert _benchmark().slower_levels(ratios, auto) == want


@pytest.mark.e2e  # the benchmark's process, through the engine
def test_benchmark_quick_runs_both_dtypes():
    """benchmarks/dtype_auto.py --quick end to end (the real run's numbers are in benchmarks/RESULTS.md)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dtype_auto.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    auto = dtype_name(resolve_dtype("auto", "cpu"))
    assert f"auto on cpu -> {auto}" in proc.stdout and f"auto picks {auto}" in proc.stdout, proc.stdout
    for c in (1, 4):
        assert re.search(rf"^\s+{c}\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\d\s+\(", proc.stdout, re.M), proc.stdout
