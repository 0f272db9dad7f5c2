"""int8-mixed: LLM.int8()-style decomposition; outlier activation features (|x| > threshold) in float."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from quant.config import QuantConfig, knob_default
from quant.layers.int8_mixed import Int8MixedLinear
from quant.registry import register_mode


@register_mode
@dataclass(frozen=True)
class Int8MixedConfig(QuantConfig):
    name: ClassVar[str] = "int8-mixed"
    description: ClassVar[str] = "LLM.int8(): outlier input features in float, the rest W8A8 int8"
    bits: ClassVar[float] = 8
    quantizes_activations: ClassVar[bool] = True

    outlier_threshold: float = knob_default("outlier_threshold")

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Int8MixedLinear.from_linear(linear, threshold=self.outlier_threshold)
