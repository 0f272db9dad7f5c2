"""fp8: float8 weights (e4m3 by default, e5m2 with QS_FP8_FORMAT) with a float32 scale per output channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from quant.config import QuantConfig
from quant.layers.fp8 import Fp8WeightOnlyLinear
from quant.primitives import FP8_DTYPES
from quant.registry import register_mode


@register_mode
@dataclass(frozen=True)
class Fp8WeightOnlyConfig(QuantConfig):
    name: ClassVar[str] = "fp8"
    description: ClassVar[str] = "weight-only float8 (e4m3 or e5m2), per-channel scale"
    bits: ClassVar[float] = 8

    fp8_format: str = "e4m3"  # QS_FP8_FORMAT

    def __post_init__(self) -> None:
        if self.fp8_format not in FP8_DTYPES:
            raise ValueError(f"fp8 format must be one of {tuple(FP8_DTYPES)}, got {self.fp8_format!r}")

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Fp8WeightOnlyLinear.from_linear(linear, self.fp8_format)
