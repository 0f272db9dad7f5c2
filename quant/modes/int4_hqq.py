"""int4-hqq: the int4 storage, with zero points optimised by half-quadratic quantization (no calibration data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quant.layers.int4 import ZeroPointMethod
from quant.modes.int4 import Int4WeightOnlyConfig
from quant.registry import register_mode


@register_mode
@dataclass(frozen=True)
class Int4HqqConfig(Int4WeightOnlyConfig):
    name: ClassVar[str] = "int4-hqq"
    description: ClassVar[str] = "weight-only int4 (int4 storage), zero points optimised by HQQ"
    zero_point: ClassVar[ZeroPointMethod] = "hqq"
