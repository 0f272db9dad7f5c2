"""Describe the machine a benchmark ran on, so a reader can tell whether its figures apply to theirs."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from quant.kernels.cpu import cpu_flags, cpuinfo

# The CPU flags that decide which kernels can run (SIMD width, integer dot products, half floats).
RELEVANT_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
    "neon",
    "asimd",
    "asimddp",
    "sve",
)


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def describe_machine() -> dict[str, Any]:
    import transformers

    info = cpuinfo()
    flags = cpu_flags()
    data: dict[str, Any] = {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": [f for f in RELEVANT_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # Other work on the machine skews timings; the load average tells the reader how busy it was.
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        data["cuda_device"] = torch.cuda.get_device_name(0)
        data["cuda_version"] = torch.version.cuda
    return data
