"""Float baselines: the whole model is cast, no layer is replaced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from quant.config import QuantConfig
from quant.registry import register_mode


@dataclass(frozen=True)
class FloatConfig(QuantConfig):
    dtype_name: ClassVar[str]

    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)


@register_mode
@dataclass(frozen=True)
class Fp32Config(FloatConfig):
    name: ClassVar[str] = "fp32"
    description: ClassVar[str] = "float32 weights and activations (reference)"
    bits: ClassVar[float] = 32
    dtype_name: ClassVar[str] = "float32"


@register_mode
@dataclass(frozen=True)
class Bf16Config(FloatConfig):
    name: ClassVar[str] = "bf16"
    description: ClassVar[str] = "bfloat16 weights and activations"
    bits: ClassVar[float] = 16
    dtype_name: ClassVar[str] = "bfloat16"


@register_mode
@dataclass(frozen=True)
class Fp16Config(FloatConfig):
    name: ClassVar[str] = "fp16"
    description: ClassVar[str] = "float16 weights and activations"
    bits: ClassVar[float] = 16
    dtype_name: ClassVar[str] = "float16"
