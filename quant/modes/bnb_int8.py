"""bnb-int8: bitsandbytes `Linear8bitLt` (LLM.int8() with outlier threshold QS_OUTLIER_THRESHOLD)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from quant.config import QuantConfig, knob_default
from quant.layers.bnb import BnbInt8Linear, import_bitsandbytes
from quant.registry import register_mode


@register_mode
@dataclass(frozen=True)
class BnbInt8Config(QuantConfig):
    name: ClassVar[str] = "bnb-int8"
    description: ClassVar[str] = "bitsandbytes Linear8bitLt (LLM.int8())"
    bits: ClassVar[float] = 8
    quantizes_activations: ClassVar[bool] = True
    backend: ClassVar[str] = "bitsandbytes"

    outlier_threshold: float = knob_default("outlier_threshold")

    def check_available(self) -> None:
        import_bitsandbytes(self.name, self.device)

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return BnbInt8Linear.from_linear(linear, threshold=self.outlier_threshold)
