"""W8A8 static: int8 per-channel weights, activations quantized with one calibrated per-tensor scale.

The storage is int8's (`w_int8` int8 [N, K], `w_scale` float32 [N]) plus `act_scale`, a float32
[1] tensor fixed at calibration: x_q = clamp(round(x / act_scale), -127, 127), so no scale is
computed per token at run time, and values beyond 127 x act_scale saturate. A per-channel
activation scale would not fold into an integer GEMM: the int32 sum over k of x_q[k] · w_q[n, k]
can only be rescaled by factors that do not depend on k (one per row of x, one per output n).
"""

from __future__ import annotations

import torch

from quant.kernels.choose import (
    LinearKernel,
    LinearSpec,
    QuantserveInt8DynamicKernel,
    choose_kernel,
    register_format,
)
from quant.kernels.reference import _add_bias, _integer_matmul

INT8_STATIC = "int8-static"  # the int8 storage + a calibrated per-tensor activation scale


def quantize_static(x: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of x with the fixed scale: divide, round half to even, saturate (as the C++ kernels do)."""
    return torch.clamp(torch.round(x.float() / act_scale.float()), -127, 127).to(torch.int8)


def reference_int8_static_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, act_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = (x_q · w_qᵀ) * act_scale * w_scale + bias, the integer product accumulated exactly."""
    acc = _integer_matmul(quantize_static(x, act_scale), w_int8.t())
    y = acc.to(torch.float32) * act_scale.float() * w_scale.float()
    return _add_bias(y.to(x.dtype), bias)


class ReferenceInt8StaticKernel(LinearKernel):
    format = INT8_STATIC

    def __call__(self, x, w_int8, w_scale, act_scale, bias):
        return reference_int8_static_linear(x, w_int8, w_scale, act_scale, bias)


class QuantserveInt8StaticKernel(QuantserveInt8DynamicKernel):
    """`quantserve::int8_static_linear`: int8_dynamic's integer GEMM (and its K limit), fed codes of the fixed scale."""

    format = INT8_STATIC
    op = "int8_static_linear"
    reference_kernel = ReferenceInt8StaticKernel


register_format(INT8_STATIC, (QuantserveInt8StaticKernel, ReferenceInt8StaticKernel))


def int8_static_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, act_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8 static for callers without a layer: the kernel is chosen for the tensors given."""
    n, k = w_int8.shape
    spec = LinearSpec(INT8_STATIC, k, n, scale_dtype=w_scale.dtype, device=x.device.type, act_dtype=x.dtype)
    return choose_kernel(spec)(x, w_int8, w_scale, act_scale, bias)
