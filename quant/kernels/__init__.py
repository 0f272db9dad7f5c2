"""Linear-layer kernels for the quantized storage formats, with reference fallbacks.

Layers call these functions and never pick an implementation themselves.
Storage formats (shared by quant modes and kernels):
- int8: `w_int8` int8 [N, K], `scale` float32 [N]; w ≈ w_int8 * scale[:, None].
- int4: `packed` uint8 [N, K // 2] (code of k = 2i in the low nibble, k = 2i+1 in
  the high nibble), `scales` and `mins` float16 [N, K // group_size];
  w[n, k] ≈ code * scales[n, k // g] + mins[n, k // g], codes 0..15.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.primitives import unpack_int4


def int8_kernel_name() -> str:
    return "reference"


def int4_kernel_name() -> str:
    return "reference"


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    codes = unpack_int4(packed).float()
    n, k = codes.shape
    grouped = codes.reshape(n, k // group_size, group_size)
    w = grouped * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(n, k)


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x · (w_int8 * scale)ᵀ + bias, for x [..., K]."""
    y = F.linear(x, w_int8.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def int8_dynamic_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8: x is quantized per token (row) to int8 at run time, then int8 · int8 with int32 accumulation."""
    from quant.primitives import quantize_symmetric

    x_q, x_scale = quantize_symmetric(x, bits=8)  # grouped view [..., 1, K], scale [..., 1, 1]
    acc = torch.matmul(x_q.squeeze(-2).to(torch.int32), w_int8.t().to(torch.int32))
    y = acc.to(torch.float32) * x_scale.squeeze(-1) * w_scale.float()
    y = y.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x · dequant(packed)ᵀ + bias, for x [..., K]."""
    w = dequantize_int4(packed, scales, mins, group_size).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
