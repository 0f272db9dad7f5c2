"""int8 linears sharing one storage, int8 [out, in] + float32 scale per output channel:
weight-only, and W8A8 with activations quantized per token at run time."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quant.kernels import INT8, INT8_DYNAMIC, LinearSpec
from quant.layers.base import QuantizedLinear
from quant.primitives import quantize_symmetric


class Int8WeightOnlyLinear(QuantizedLinear):
    """y = (x · qᵀ) * scale + b, with q int8 [out, in] and scale float32 [out]."""

    kernel_format: ClassVar[str] = INT8

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.select_kernel()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> Int8WeightOnlyLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        q, scale = quantize_symmetric(linear.weight.detach(), bits=8)
        layer.weight_int8 = q.reshape(linear.out_features, linear.in_features).contiguous()
        layer.scale = scale.reshape(linear.out_features).float().contiguous()
        layer._copy_bias(linear)
        return layer._placed_like(linear)

    def kernel_spec(self) -> LinearSpec:
        return self._spec(self.weight_int8, scale_dtype=self.scale.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_kernel(x, self.weight_int8, self.scale, self.bias)


class Int8DynamicLinear(Int8WeightOnlyLinear):
    """W8A8: activations are quantized per token (absmax) at run time; int8 · int8 accumulates in int32."""

    kernel_format: ClassVar[str] = INT8_DYNAMIC
