"""4-bit NormalFloat linear (QLoRA's data type), our own implementation.

Storage: `packed` uint8 [out, in // 2] (NF4 code indices, two per byte as in
int4) and `absmax` float16 [out, in // block_size].
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quant.kernels import NF4, LinearSpec
from quant.layers.base import QuantizedLinear
from quant.primitives import dequantize_nf4_packed, pack_int4, quantize_nf4


class NF4Linear(QuantizedLinear):
    """Forward runs the chosen kernel: ours on CPU (levels looked up per code), else dequantize and a float matmul."""

    kernel_format: ClassVar[str] = NF4

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size: int = 64) -> None:
        super().__init__(in_features, out_features, bias)
        if not self.supports(in_features, block_size):
            raise ValueError(f"in_features {in_features} is not a multiple of block size {block_size}")
        self.block_size = block_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.ones(out_features, in_features // block_size, dtype=torch.float16))
        self.select_kernel()

    @staticmethod
    def supports(in_features: int, block_size: int) -> bool:
        return block_size % 2 == 0 and in_features % block_size == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64) -> NF4Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size)
        weight = linear.weight.detach().float()
        codes, absmax = quantize_nf4(weight, block_size)
        layer.packed = pack_int4(codes.reshape(weight.shape)).contiguous()
        layer.absmax = absmax.squeeze(-1).to(torch.float16).contiguous()
        layer._copy_bias(linear)
        return layer._placed_like(linear)

    def kernel_spec(self) -> LinearSpec:
        return self._spec(self.packed, group_size=self.block_size, scale_dtype=self.absmax.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize_nf4_packed(self.packed, self.absmax, self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_kernel(x, self.packed, self.absmax, self.block_size, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"
