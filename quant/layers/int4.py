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
from quant.primitives import affine_codes, affine_minmax_params, grouped, optimize_affine_hqq, pack_int4

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
        weight = linear.weight.detach().float()
        scales, mins = int4_group_params(weight, group_size, zero_point)
        return cls.from_storage(linear, int4_codes(weight, scales, mins), scales, mins)

    @classmethod
    def from_storage(
        cls, linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
    ) -> Int4WeightOnlyLinear:
        """The layer holding given codes [out, in] (0..15) and float16 scales and mins [out, n_groups]
        (e.g. GPTQ's choice); `linear` gives the bias, the device and the activations' dtype."""
        group_size = linear.in_features // scales.shape[1]
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        layer.packed = pack_int4(codes.reshape(linear.out_features, linear.in_features)).contiguous()
        layer.scales = scales.reshape(layer.scales.shape).to(torch.float16).contiguous()
        layer.mins = mins.reshape(layer.mins.shape).to(torch.float16).contiguous()
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


def int4_group_params(
    weight: torch.Tensor, group_size: int, zero_point: ZeroPointMethod = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored float16 scales and mins [out, n_groups, 1] int4 gives `weight` [out, in]."""
    if zero_point == "hqq":
        _, scale, zero = optimize_affine_hqq(weight.float(), 4, group_size=group_size)
    else:
        scale, zero = affine_minmax_params(weight, 4, group_size=group_size)
    # Round the parameters to their stored float16 first; codes are then chosen on that stored
    # grid (`int4_codes`), so storage rounding costs nothing extra.
    return scale.clamp_min(2.0**-24).to(torch.float16), (-zero * scale).to(torch.float16)


def int4_codes(weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Each weight's nearest code [out, in] on the grid of stored `scales` and `mins` [out, n_groups, 1]."""
    group_size = weight.shape[-1] // scales.shape[-2]
    return affine_codes(grouped(weight, group_size), scales.float(), mins.float(), bits=4).reshape(weight.shape)


def int4_dequantized(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The float weight [out, in] that codes and stored parameters [out, n_groups, 1] stand for,
    computed as the kernels compute it."""
    group_size = codes.shape[-1] // scales.shape[-2]
    return (grouped(codes.float(), group_size) * scales.float() + mins.float()).reshape(codes.shape)
