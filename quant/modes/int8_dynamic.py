"""int8-dynamic: W8A8, int8 per-channel weights and int8 per-token activations quantized at run time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from quant.config import QuantConfig
from quant.layers.int8 import Int8DynamicLinear
from quant.registry import register_mode


@register_mode
@dataclass(frozen=True)
class Int8DynamicConfig(QuantConfig):
    name: ClassVar[str] = "int8-dynamic"
    description: ClassVar[str] = "W8A8: int8 per-channel weights, int8 per-token dynamic activations"
    bits: ClassVar[float] = 8
    quantizes_activations: ClassVar[bool] = True

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Int8DynamicLinear.from_linear(linear)
