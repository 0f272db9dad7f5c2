"""bnb-nf4 and bnb-fp4: bitsandbytes `Linear4bit` (block 64, double-quantized block scales)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from quant.config import QuantConfig
from quant.layers.bnb import BLOCK_SIZE_4BIT, Bnb4bitLinear, import_bitsandbytes
from quant.registry import register_mode


@dataclass(frozen=True)
class Bnb4bitConfig(QuantConfig):
    bits: ClassVar[float] = 4
    backend: ClassVar[str] = "bitsandbytes"
    quant_type: ClassVar[Literal["nf4", "fp4"]]

    def check_available(self) -> None:
        import_bitsandbytes(self.name, self.device)

    def group_size_label(self) -> int:
        return BLOCK_SIZE_4BIT

    def quantize_linear(self, linear: nn.Linear) -> nn.Module | None:
        if not Bnb4bitLinear.supports(linear.out_features, linear.weight.device):
            return None
        return Bnb4bitLinear.from_linear(linear, self.quant_type)


@register_mode
@dataclass(frozen=True)
class BnbNF4Config(Bnb4bitConfig):
    name: ClassVar[str] = "bnb-nf4"
    description: ClassVar[str] = "bitsandbytes Linear4bit, 4-bit NormalFloat"
    quant_type: ClassVar[Literal["nf4", "fp4"]] = "nf4"


@register_mode
@dataclass(frozen=True)
class BnbFP4Config(Bnb4bitConfig):
    name: ClassVar[str] = "bnb-fp4"
    description: ClassVar[str] = "bitsandbytes Linear4bit, 4-bit float (e2m1)"
    quant_type: ClassVar[Literal["nf4", "fp4"]] = "fp4"
