"""Typed configuration shared by every precision mode.

`QuantOptions` carries the user's generic knobs (from the service settings or a
CLI); each mode turns them into its own frozen config with `from_options`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn


GROUP_SIZES = (32, 64, 128)  # group sizes the 4-bit storage and kernels take
FP8_FORMATS = ("e4m3", "e5m2")


@dataclass(frozen=True)
class QuantOptions:
    """Knobs a user may set; a mode reads the ones it understands and ignores the rest."""

    group_size: int = 64
    outlier_threshold: float = 6.0
    fp8_format: str = "e4m3"
    quantize_lm_head: bool = False
    skip_modules: tuple[str, ...] = ()
    device: str = "cpu"


class ModeUnavailableError(RuntimeError):
    """The mode cannot run here (missing library, unsupported device); the message says why."""


@dataclass(frozen=True)
class QuantConfig:
    """Base class of every mode's config.

    A mode is either a float mode (`weight_dtype` set: the whole model is cast)
    or a linear-replacing mode (`quantize_linear` overridden).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    bits: ClassVar[float]
    backend: ClassVar[str] = "torch"

    quantize_lm_head: bool = False
    skip_modules: tuple[str, ...] = field(default=())
    device: str = "cpu"

    @classmethod
    def from_options(cls, options: QuantOptions) -> QuantConfig:
        """Every config field named like a `QuantOptions` knob (e.g. `group_size`) takes the user's value."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)})

    def check_available(self) -> None:
        """Raise ModeUnavailableError when this mode cannot run on `self.device`."""

    def compute_dtype(self) -> torch.dtype:
        """Dtype of activations (and of the float parts of the model)."""
        import torch

        return torch.float32

    def quantize_linear(self, linear: nn.Linear) -> nn.Module | None:
        """Return the replacement module for `linear`, or None to keep it float
        (e.g. a shape the kernel cannot take; counted as a fallback)."""
        raise NotImplementedError

    @property
    def replaces_linears(self) -> bool:
        return type(self).quantize_linear is not QuantConfig.quantize_linear

    def group_size_label(self) -> int | None:
        return getattr(self, "group_size", None)
