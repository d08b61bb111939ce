"""Per-GPU memory and utilization through NVML (nvidia-ml-py). Where NVML is missing (no driver, no GPU: `nvmlInit`
raises) the reader holds no GPU and the GPU metrics are simply absent.

It reads every GPU NVML shows this process's container (a Kubernetes pod: the GPUs allocated to it), not only the
ones CUDA_VISIBLE_DEVICES names: an AttentionRouter replica sees its own GPU, while its unit's shards hold the
others. Two engine processes in one pod therefore report the same GPUs (told apart by Ray's WorkerId label):
aggregate with `max by (gpu_uuid)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    index: int
    uuid: str
    memory_used: int  # bytes
    memory_total: int  # bytes
    utilization: float  # 0..1 of NVML's last sample period


class GpuReader:
    def __init__(self) -> None:
        self._nvml = None
        self._handles: list[tuple[int, str, object]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                self._handles.append((i, _text(pynvml.nvmlDeviceGetUUID(handle)), handle))
            self._nvml = pynvml
        except Exception as e:  # ImportError, NVMLError (no library, no driver): no GPU metrics
            log.info("no GPU metrics: NVML is not available (%s)", e)

    @property
    def available(self) -> bool:
        return self._nvml is not None and bool(self._handles)

    def read(self) -> list[GpuSample]:
        """One sample per GPU that answers (a GPU whose query fails is left out this time)."""
        if self._nvml is None:
            return []
        nvml, samples = self._nvml, []
        for index, uuid, handle in self._handles:
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                busy = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            except nvml.NVMLError as e:
                log.debug("GPU %d: %s", index, e)
                continue
            samples.append(GpuSample(index, uuid, int(memory.used), int(memory.total), busy / 100.0))
        return samples


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
