"""int8 linears sharing one storage, int8 [out, in] + float32 scale per output channel:
weight-only, and W8A8 with activations quantized per token at run time."""

from __future__ import annotations

import torch
from torch import nn

from quant.kernels import int8_dynamic_linear, int8_kernel_name, int8_linear
from quant.layers.base import QuantizedLinear
from quant.primitives import quantize_symmetric


class Int8WeightOnlyLinear(QuantizedLinear):
    """y = (x · qᵀ) * scale + b, with q int8 [out, in] and scale float32 [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> Int8WeightOnlyLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        q, scale = quantize_symmetric(linear.weight.detach(), bits=8)
        layer.weight_int8 = q.reshape(linear.out_features, linear.in_features).contiguous()
        layer.scale = scale.reshape(linear.out_features).float().contiguous()
        layer._copy_bias(linear)
        layer.kernel = int8_kernel_name()
        return layer.to(linear.weight.device)

    def dequantize_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.scale, self.bias)


class Int8DynamicLinear(Int8WeightOnlyLinear):
    """W8A8: activations are quantized per token (absmax) at run time; int8 · int8 accumulates in int32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_dynamic_linear(x, self.weight_int8, self.scale, self.bias)
