"""nf4: 4-bit NormalFloat with one float16 absmax per block of 64 inputs (our implementation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from quant.config import QuantConfig
from quant.layers.nf4 import NF4Linear
from quant.registry import register_mode


@register_mode
@dataclass(frozen=True)
class NF4Config(QuantConfig):
    name: ClassVar[str] = "nf4"
    description: ClassVar[str] = "4-bit NormalFloat, per-block (64) absmax, two codes per byte"
    bits: ClassVar[float] = 4

    block_size: ClassVar[int] = 64  # fixed, as in QLoRA: not a knob

    def group_size_label(self) -> int:
        return self.block_size

    def quantize_linear(self, linear: nn.Linear) -> nn.Module | None:
        if not NF4Linear.supports(linear.in_features, self.block_size):
            return None
        return NF4Linear.from_linear(linear, self.block_size)
