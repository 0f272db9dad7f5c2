"""Linear-layer kernels for the quantized storage formats, with reference fallbacks.

Storage formats (shared by quant modes and kernels):
- int8: `w_int8` int8 [N, K], `scale` float32 [N]; w ≈ w_int8 * scale[:, None].
- int4: `packed` uint8 [N, K // 2] (code of k = 2i in the low nibble, k = 2i+1 in
  the high nibble), `scales` and `mins` float16 [N, K // group_size];
  w[n, k] ≈ code * scales[n, k // g] + mins[n, k // g], codes 0..15.
- nf4: `packed` as int4 (NormalFloat level indices), `absmax` float16 [N, K // block_size];
  w[n, k] = NF4_CODE[code] * absmax[n, k // block_size].
- fp8: `weight_fp8` float8_e4m3fn or float8_e5m2 [N, K], `scale` float32 [N];
  w = float(weight_fp8) * scale[:, None].

Kernels (`choose.py`): small objects, one per implementation of a format, each with a `name`
(reported by layers, `QuantReport.kernels` and `/info`) and `can_implement(spec)`:
- "quantserve-<isa>": our C++ kernels (`csrc/`, ops `torch.ops.quantserve.*`), preferred on
  CPU for float32/bfloat16 activations. The int8 and int4 ops quantize activations to int8
  on the fly (per 32-element block; per row for int8-dynamic, as its reference does) and run
  integer SIMD dot products: AVX2 everywhere, AVX-512 VNNI where the CPU has it. The nf4 and
  fp8 ops (`csrc/lut_ops.cpp`) look their codes up into float32 strips of 16 rows and keep
  the activations exact; the native decode step runs all four formats in packed tiles.
- "reference": dequantize-then-float-matmul in plain torch (`reference.py`; any device, dtype, shape).
- "bitsandbytes": bitsandbytes' own modules.
A layer asks `choose_kernel(spec)` once, when it is built (and again when `.to()` converts its
storage), keeps the kernel and calls it; why a better kernel was skipped is logged once per
reason. Per call, the native kernels only check what quantize time cannot know (activations
on another device or of another dtype, inputs that require grad: the reference runs, the
reason logged once) and `use_reference()`, the explicit A/B switch.

Options (`native.py`): `configure(kernels=..., isa=...)`, called by the service from its settings
before loading; until then the environment's QS_KERNELS (`reference` forces the reference path,
no build) and QS_KERNEL_ISA (`avx2` or `avx512vnni`; default: the best the CPU runs) apply, for
the CLIs.

The functional ops below (`int8_linear`, `int8_dynamic_linear`, `int4_linear`, `nf4_linear`,
`fp8_linear`) serve callers
without a layer (tools, tests): they choose for the tensors they are given, on every call.
"""

from __future__ import annotations

import torch

from quant.kernels.choose import (
    ACTIVATION_DTYPES,
    BNB,
    BNB_INT8,
    CANDIDATES,
    FP8,
    INT4,
    INT8,
    INT8_DYNAMIC,
    INT8_DYNAMIC_MAX_K,
    NF4,
    LinearKernel,
    LinearSpec,
    candidates,
    choose_kernel,
    int4_group_size_reason,
    int4_kernel_name,
    int8_kernel_name,
    kernel_name,
)
from quant.kernels.native import _LOGGED as _LOGGED  # the loader's internals, reached into by tests
from quant.kernels.native import _NATIVE as _NATIVE
from quant.kernels.native import (
    REFERENCE,
    active_isa,
    configure,
    native_ops,
    use_reference,
)
from quant.kernels.native import _load_native as _load_native
from quant.kernels.native import _requested as _requested
from quant.kernels.reference import dequantize_int4

__all__ = [
    "ACTIVATION_DTYPES",
    "BNB",
    "BNB_INT8",
    "CANDIDATES",
    "FP8",
    "INT4",
    "INT8",
    "INT8_DYNAMIC",
    "INT8_DYNAMIC_MAX_K",
    "NF4",
    "REFERENCE",
    "LinearKernel",
    "LinearSpec",
    "active_isa",
    "candidates",
    "choose_kernel",
    "configure",
    "dequantize_int4",
    "fp8_linear",
    "int4_group_size_reason",
    "int4_kernel_name",
    "int4_linear",
    "int8_dynamic_linear",
    "int8_kernel_name",
    "int8_linear",
    "kernel_name",
    "native_ops",
    "nf4_linear",
    "use_reference",
]


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x · (w_int8 * scale)ᵀ + bias, for x [..., K]."""
    n, k = w_int8.shape
    spec = LinearSpec(INT8, k, n, scale_dtype=scale.dtype, device=x.device.type, act_dtype=x.dtype)
    return choose_kernel(spec)(x, w_int8, scale, bias)


def int8_dynamic_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8: x is quantized per token (row) to int8 at run time, then int8 · int8 with int32 accumulation."""
    n, k = w_int8.shape
    spec = LinearSpec(INT8_DYNAMIC, k, n, scale_dtype=w_scale.dtype, device=x.device.type, act_dtype=x.dtype)
    return choose_kernel(spec)(x, w_int8, w_scale, bias)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x · dequant(packed)ᵀ + bias, for x [..., K]."""
    spec = LinearSpec(
        INT4,
        packed.shape[1] * 2,
        packed.shape[0],
        group_size=group_size,
        scale_dtype=scales.dtype,
        min_dtype=mins.dtype,
        device=x.device.type,
        act_dtype=x.dtype,
    )
    return choose_kernel(spec)(x, packed, scales, mins, group_size, bias)


def nf4_linear(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, block_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x · dequant_nf4(packed, absmax)ᵀ + bias, for x [..., K]."""
    spec = LinearSpec(
        NF4,
        packed.shape[1] * 2,
        packed.shape[0],
        group_size=block_size,
        scale_dtype=absmax.dtype,
        device=x.device.type,
        act_dtype=x.dtype,
    )
    return choose_kernel(spec)(x, packed, absmax, block_size, bias)


def fp8_linear(
    x: torch.Tensor, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x · (float(weight_fp8) * scale)ᵀ + bias, for x [..., K]."""
    n, k = weight_fp8.shape
    spec = LinearSpec(FP8, k, n, scale_dtype=scale.dtype, device=x.device.type, act_dtype=x.dtype)
    return choose_kernel(spec)(x, weight_fp8, scale, bias)
