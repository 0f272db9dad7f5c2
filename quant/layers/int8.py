"""Weight-only int8 linear: symmetric absmax, one scale per output channel."""

from __future__ import annotations

import torch
from torch import nn

from quant.kernels import int8_kernel_name, int8_linear
from quant.layers.base import QuantizedLinear
from quant.primitives import quantize_symmetric


class Int8WeightOnlyLinear(QuantizedLinear):
    """y = (x · qᵀ) * scale + b, with q int8 [out, in] and scale float32 [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
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
