"""Where the benchmark runs: device and dtype picked once, a synchronizing timer, the setup record."""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> float:
        """Wall seconds of fn(), device work included."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def setup(self) -> dict:
        return {
            "device": str(self.device),
            "device_name": _device_name(self.device),
            "dtype": self.dtype_name,
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0],  # other work on the machine skews every number
            "python": platform.python_version(),
            "platform": platform.platform(),
        }


def pick_runtime(device: str = "auto") -> Runtime:
    """CUDA with bf16 when there is a GPU, else CPU with fp32 (CPU bf16 matmuls are slow)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return Runtime(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux: the CPU model, e.g. "AMD EPYC 7R13 Processor"
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
