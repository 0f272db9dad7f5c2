"""fp8: float8 weights (e4m3 by default, e5m2 with QS_FP8_FORMAT) with a float32 scale per output channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from quant.config import QuantConfig, knob_default
from quant.layers.fp8 import Fp8WeightOnlyLinear
from quant.registry import register_mode


@register_mode
@dataclass(frozen=True)
class Fp8WeightOnlyConfig(QuantConfig):
    name: ClassVar[str] = "fp8"
    description: ClassVar[str] = "weight-only float8 (e4m3 or e5m2), per-channel scale"
    bits: ClassVar[float] = 8

    fp8_format: str = knob_default("fp8_format")

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Fp8WeightOnlyLinear.from_linear(linear, self.fp8_format)
