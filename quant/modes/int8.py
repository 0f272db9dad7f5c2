"""int8: weight-only, symmetric absmax int8 with one scale per output channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from quant.config import QuantConfig
from quant.layers.int8 import Int8WeightOnlyLinear
from quant.registry import register_mode


@register_mode
@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    name: ClassVar[str] = "int8"
    description: ClassVar[str] = "weight-only int8, symmetric per-output-channel absmax"
    bits: ClassVar[float] = 8

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Int8WeightOnlyLinear.from_linear(linear)
