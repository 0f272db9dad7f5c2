"""Reference implementations: dequantize, then a float matmul in plain torch (any device, dtype, shape).

Pure tensor functions, the bottom of the stack: the reference kernels call them, and the
native kernels fall back to them for inputs they cannot take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.primitives import dequantize_nf4_packed, quantize_symmetric, unpack_int4


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    codes = unpack_int4(packed).float()
    n, k = codes.shape
    grouped = codes.reshape(n, k // group_size, group_size)
    w = grouped * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(n, k)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x · (w_int8 * scale)ᵀ + bias."""
    return _add_bias(F.linear(x, w_int8.to(x.dtype)) * scale.to(x.dtype), bias)


def _integer_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer a · b of int8 codes. CUDA has no integer matmul ("addmm_cuda" not implemented
    for Int), so there the sums run in float64, which holds them exactly (|sum| <= K·127·128 < 2^53)."""
    if a.device.type == "cpu":
        return torch.matmul(a.to(torch.int32), b.to(torch.int32))
    return torch.matmul(a.to(torch.float64), b.to(torch.float64))


def int8_dynamic_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8: x quantized per token (row) to int8, int8 · int8 accumulated in int32."""
    x_q, x_scale = quantize_symmetric(x, bits=8)  # grouped view [..., 1, K], scale [..., 1, 1]
    acc = _integer_matmul(x_q.squeeze(-2), w_int8.t())
    y = acc.to(torch.float32) * x_scale.squeeze(-1) * w_scale.float()
    return _add_bias(y.to(x.dtype), bias)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x · dequant(packed)ᵀ + bias."""
    w = dequantize_int4(packed, scales, mins, group_size).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def nf4_linear(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, block_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x · dequant_nf4(packed)ᵀ + bias."""
    weight = dequantize_nf4_packed(packed, absmax, block_size).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def fp8_linear(
    x: torch.Tensor, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = (x · upcast(weight_fp8)ᵀ) * scale + bias (float8 matmuls need float8 activations and recent GPUs)."""
    return _add_bias(F.linear(x, weight_fp8.to(x.dtype)) * scale.to(x.dtype), bias)


def dequantize_int8_g32(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """w[n, k] = codes[n, k] * scales[n, k // 32] (llama.cpp's Q8_0 layout)."""
    n, k = codes.shape
    return (codes.float().reshape(n, k // 32, 32) * scales.float()[..., None]).reshape(n, k)


def int8_g32_linear(
    x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x · dequant(weight_int8, scales)ᵀ + bias."""
    return _add_bias(F.linear(x, dequantize_int8_g32(weight_int8, scales).to(x.dtype)), bias)
