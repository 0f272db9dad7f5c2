"""What this CPU can do, from /proc/cpuinfo: the facts the kernel choices below torch depend on.

torch 2.13 does not say whether oneDNN has 16-bit GEMM hardware to use. Without it a bfloat16
or float16 GEMM is converted element by element, 5-10x slower than float32 (measured with
`ONEDNN_MAX_CPU_ISA` capped below AVX512_CORE_BF16 / AVX512_CORE_FP16 on a Sapphire Rapids):
that is the Zen 3 case for both, and the Zen 4 case for float16.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

# 16-bit GEMM instructions oneDNN uses, by dtype (AVX-512 dot products or AMX tiles)
_FAST_GEMM_FLAGS = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16"}),
    torch.float16: frozenset({"avx512_fp16", "amx_fp16"}),
}


@functools.cache
def cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo (empty off Linux)."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return {}
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    info = cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


# oneDNN's ISA levels, lowest first (ONEDNN_MAX_CPU_ISA caps what it uses), and the lowest with
# 16-bit GEMM instructions for each dtype
_ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX10_1_512",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX_FP16",
)
_ONEDNN_MIN_ISA = {torch.bfloat16: "AVX512_CORE_BF16", torch.float16: "AVX512_CORE_FP16"}


def _onednn_capped_below(dtype: torch.dtype) -> bool:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap in _ONEDNN_ISAS and _ONEDNN_ISAS.index(cap) < _ONEDNN_ISAS.index(_ONEDNN_MIN_ISA[dtype])


def has_fast_gemm(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMM in `dtype` runs on hardware for it: the CPU has the instructions and
    ONEDNN_MAX_CPU_ISA does not cap oneDNN below them (True when unknown: not x86 Linux)."""
    if dtype not in _FAST_GEMM_FLAGS or platform.machine() not in ("x86_64", "AMD64") or not cpu_flags():
        return True
    return bool(_FAST_GEMM_FLAGS[dtype] & cpu_flags()) and not _onednn_capped_below(dtype)
