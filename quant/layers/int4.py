"""Weight-only 4-bit linear: asymmetric group-wise codes packed two per byte.

Storage (shared with quant.kernels): `packed` uint8 [out, in // 2] (even k in the
low nibble), `scales` and `mins` float16 [out, in // group_size];
w[n, k] ≈ code * scales[n, k // g] + mins[n, k // g].
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from quant.kernels import INT4, LinearSpec, dequantize_int4
from quant.layers.base import QuantizedLinear
from quant.primitives import affine_codes, grouped, optimize_affine_hqq, pack_int4, quantize_affine

ZeroPointMethod = Literal["minmax", "hqq"]


class Int4WeightOnlyLinear(QuantizedLinear):
    kernel_format: ClassVar[str] = INT4

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64) -> None:
        super().__init__(in_features, out_features, bias)
        if not self.supports(in_features, group_size):
            raise ValueError(f"in_features {in_features} is not a multiple of group size {group_size}")
        self.group_size = group_size
        n_groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("mins", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.select_kernel()

    @staticmethod
    def supports(in_features: int, group_size: int) -> bool:
        return group_size % 2 == 0 and in_features % group_size == 0

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 64, zero_point: ZeroPointMethod = "minmax"
    ) -> Int4WeightOnlyLinear:
        """Quantize `linear`; `zero_point="hqq"` optimises the zero points (HQQ) instead of min-max."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        weight = linear.weight.detach().float()
        quantize = optimize_affine_hqq if zero_point == "hqq" else quantize_affine
        _, scale, zero = quantize(weight, 4, group_size=group_size)
        # Round the parameters to their stored float16 first, then pick each weight's
        # nearest code on that stored grid, so storage rounding costs nothing extra.
        scales = scale.clamp_min(2.0**-24).to(torch.float16)
        mins = (-zero * scale).to(torch.float16)
        codes = affine_codes(grouped(weight, group_size), scales.float(), mins.float(), bits=4)
        layer.packed = pack_int4(codes.reshape(weight.shape)).contiguous()
        layer.scales = scales.squeeze(-1).contiguous()
        layer.mins = mins.squeeze(-1).contiguous()
        layer._copy_bias(linear)
        return layer._placed_like(linear)

    def kernel_spec(self) -> LinearSpec:
        return self._spec(
            self.packed, group_size=self.group_size, scale_dtype=self.scales.dtype, min_dtype=self.mins.dtype
        )

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize_int4(self.packed, self.scales, self.mins, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_kernel(x, self.packed, self.scales, self.mins, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
