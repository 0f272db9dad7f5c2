"""float8 weight-only linear with one float32 scale per output channel (e4m3 or e5m2)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quant.kernels import FP8, LinearSpec
from quant.layers.base import QuantizedLinear
from quant.primitives import FP8_DTYPES, dequantize_fp8, quantize_fp8


class Fp8WeightOnlyLinear(QuantizedLinear):
    """Forward runs the chosen kernel: ours on CPU (codes widened exactly to float32), else
    upcast the float8 weight to the activation dtype and scale the output per channel.

    float8 matmuls (torch._scaled_mm) need float8 activations too and exist only on
    recent GPUs, so this layer is weight-only everywhere.
    """

    kernel_format: ClassVar[str] = FP8

    def __init__(self, in_features: int, out_features: int, bias: bool = False, fmt: str = "e4m3") -> None:
        super().__init__(in_features, out_features, bias)
        self.fmt = fmt
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8_DTYPES[fmt]))
        self.register_buffer("scale", torch.ones(out_features))
        self.select_kernel()

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "e4m3") -> Fp8WeightOnlyLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt)
        q, scale = quantize_fp8(linear.weight.detach(), fmt)
        layer.weight_fp8 = q.contiguous()
        layer.scale = scale.squeeze(-1).contiguous()
        layer._copy_bias(linear)
        return layer._placed_like(linear)

    def kernel_spec(self) -> LinearSpec:
        return self._spec(self.weight_fp8, scale_dtype=self.scale.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize_fp8(self.weight_fp8, self.scale[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_kernel(x, self.weight_fp8, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.fmt}"
