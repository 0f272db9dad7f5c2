"""W8A8 static: int8 weights per output channel, activations quantized with a calibrated per-tensor scale."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quant.kernels import LinearSpec
from quant.kernels.int8_static import INT8_STATIC
from quant.layers.int8 import Int8WeightOnlyLinear


class Int8StaticLinear(Int8WeightOnlyLinear):
    """y = (round(x / act_scale) · qᵀ) * act_scale * scale + b: int8 · int8 accumulated in int32,
    with `act_scale` fixed by calibration (no per-token absmax at run time)."""

    kernel_format: ClassVar[str] = INT8_STATIC

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("act_scale", torch.ones(1))  # float32 [1], set from calibration

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_scale: float | torch.Tensor = 1.0) -> Int8StaticLinear:  # type: ignore[override]
        """Quantize `linear`'s weight; `act_scale` is the calibrated step of its input (> 0)."""
        value = float(act_scale)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"act_scale must be finite and > 0, got {value}")
        layer = super().from_linear(linear)
        assert isinstance(layer, Int8StaticLinear)
        layer.act_scale.fill_(value)
        return layer

    def kernel_spec(self) -> LinearSpec:
        return self._spec(self.weight_int8, scale_dtype=self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_kernel(x, self.weight_int8, self.scale, self.act_scale, self.bias)
