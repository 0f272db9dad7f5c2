"""Typed configuration shared by every precision mode.

`QuantOptions` carries the user's generic knobs (from the service settings or a
CLI); each mode turns them into its own frozen config with `from_options`.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, get_type_hints

if TYPE_CHECKING:
    import torch
    from torch import nn


GROUP_SIZES = (32, 64, 128)  # group sizes the 4-bit storage and kernels take
FP8_FORMATS = ("e4m3", "e5m2")
LM_HEAD_CHOICES = ("auto", "true", "false")
ACTIVATION_OBSERVERS = ("minmax", "percentile", "mse")  # int8-static (quant.observers)
_MODULE_PATTERN = re.compile(r"[\w.*?\[\]]+")  # a module name, or an fnmatch pattern of names


def one_of(values: tuple[object, ...]) -> str:
    """`a, b or c`, for messages and help texts."""
    return ", ".join(str(v) for v in values[:-1]) + f" or {values[-1]}"


def knob(default: Any, help: str, *, choices: tuple[object, ...] = (), positive: bool = False) -> Any:
    """Declare a user-settable quantization knob: its default, help and allowed values, once.

    The service settings (QS_<NAME>), the CLIs (--name) and the modes' config fields all derive from it.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "positive": positive})


@dataclass(frozen=True)
class QuantOptions:
    """The knobs a user may set. A mode reads those its config has a field for (see `QuantConfig`)."""

    group_size: int = knob(64, "group size of the 4-bit modes", choices=GROUP_SIZES)
    outlier_threshold: float = knob(6.0, "int8-mixed: activation magnitude kept in float", positive=True)
    fp8_format: str = knob("e4m3", "fp8 storage format", choices=FP8_FORMATS)
    quantize_lm_head: str = knob(
        "auto",
        "the tied output head: auto = int8 with a scale per 32 (Q8_0 layout) on CPU in quantized modes, "
        "float otherwise; true = the mode's own format; false = float",
        choices=LM_HEAD_CHOICES,
    )
    skip_modules: tuple[str, ...] = knob((), "module name patterns (fnmatch) kept in float")
    calibration_file: str = knob(
        "", "calibrated modes: UTF-8 text to calibrate on; empty = Python's own pydoc_data.topics"
    )
    calibration_tokens: int = knob(32768, "calibrated modes: tokens of the calibration text used", positive=True)
    activation_observer: str = knob(
        "minmax",
        "int8-static: how each input's activation step is chosen from calibration (largest |x|, "
        "99.99th percentile of |x|, or the clip with the least squared error)",
        choices=ACTIVATION_OBSERVERS,
    )
    smoothquant_alpha: str = knob(
        "auto",
        "int8-static: SmoothQuant migration strength, 0 to 1 (0: no smoothing), or auto: chosen per layer "
        "group from the calibration data",
    )
    dynamic_activation_modules: tuple[str, ...] = knob(
        ("down_proj",),
        "int8-static: module name patterns (fnmatch) whose input is quantized per token at run time "
        "(int8-dynamic's path, after smoothing) instead of with a calibrated step; empty: every input static",
    )
    device: str = "cpu"  # where the model runs: resolved by the caller, not a knob

    def __post_init__(self) -> None:
        for name in self.knob_names():
            object.__setattr__(self, name, normalize_knob(name, getattr(self, name)))
            check_knob(name, getattr(self, name))

    @classmethod
    def knobs(cls) -> dict[str, Field[Any]]:
        """The knobs' dataclass fields by name; their types are in `knob_types()`."""
        return {f.name: f for f in fields(cls) if "help" in f.metadata}

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        return tuple(cls.knobs())

    @classmethod
    def knob_types(cls) -> dict[str, Any]:
        hints = get_type_hints(cls)
        return {name: hints[name] for name in cls.knobs()}

    @classmethod
    def help_text(cls, name: str) -> str:
        meta = cls.knobs()[name].metadata
        return meta["help"] + (f": {one_of(meta['choices'])}" if meta["choices"] else "")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One `--knob-name` option per knob, for the CLIs."""
        for name, kind in cls.knob_types().items():
            flag, default = "--" + name.replace("_", "-"), cls.knobs()[name].default
            if kind is bool:
                parser.add_argument(flag, action="store_true", help=cls.help_text(name))
            elif kind == tuple[str, ...]:
                parser.add_argument(
                    flag, type=split_patterns, default=default, help=f"{cls.help_text(name)}, comma-separated"
                )
            else:
                parser.add_argument(flag, type=kind, default=default, help=f"{cls.help_text(name)} (default {default})")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, device: str = "cpu") -> QuantOptions:
        """The options a CLI's parsed `add_arguments` options give; raises ValueError on a bad value."""
        return cls(**{name: getattr(args, name) for name in cls.knob_names()}, device=device)


def knob_default(name: str) -> Any:
    """A mode's field for knob `name` starts from the knob's own default: `group_size: int = knob_default("group_size")`."""
    return QuantOptions.knobs()[name].default


def normalize_knob(name: str, value: object) -> object:
    """The canonical form of a knob's value: a bool (or "True", "1") for the head's knob becomes "true"/"false"."""
    if name == "smoothquant_alpha" and isinstance(value, int | float) and not isinstance(value, bool):
        return repr(float(value))  # 0.5 -> "0.5": one spelling for the cache key and /info
    if name == "smoothquant_alpha" and isinstance(value, str):
        return value.strip().lower()
    if name == "quantize_lm_head":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return {"1": "true", "0": "false", "yes": "true", "no": "false"}.get(value.lower(), value.lower())
    return value


def check_knob(name: str, value: object) -> None:
    """Raise ValueError (naming the knob and what it accepts) unless `value` is allowed for knob `name`."""
    meta = QuantOptions.knobs()[name].metadata
    label = name.replace("_", " ")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"{label} must be one of {one_of(meta['choices'])}, got {value!r}")
    if meta["positive"] and not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"{label} must be greater than 0, got {value!r}")
    if name == "smoothquant_alpha" and value != "auto" and not 0 <= _as_float(value) <= 1:
        raise ValueError(f"{label} must be auto or between 0 and 1, got {value!r}")
    if name == "calibration_file" and value and not Path(str(value)).expanduser().is_file():
        raise ValueError(f"{value!r} is not a file (leave it empty for Python's own pydoc_data.topics)")
    if name in ("skip_modules", "dynamic_activation_modules"):
        for pattern in value:  # type: ignore[attr-defined]
            if not _MODULE_PATTERN.fullmatch(pattern):
                raise ValueError(f"{pattern!r} is not a module name pattern (letters, digits, _ . * ? [ ])")


def _as_float(value: object) -> float:
    """`value` as a float, or NaN (which no range check passes)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def module_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether module `name` matches a pattern knob: "down_proj" matches "model.layers.3.mlp.down_proj";
    globs work as usual."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in patterns)


def split_patterns(value: str) -> tuple[str, ...]:
    """`"a, b.*,"` -> ("a", "b.*"): the comma-separated form of a list knob (environment, CLI)."""
    return tuple(p.strip() for p in value.split(",") if p.strip())


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
    quantizes_activations: ClassVar[bool] = False  # inputs are quantized at run time too (W8A8), not weights only

    quantize_lm_head: str = knob_default("quantize_lm_head")
    skip_modules: tuple[str, ...] = field(default=())
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in self.knobs_read():
            object.__setattr__(self, name, normalize_knob(name, getattr(self, name)))
            check_knob(name, getattr(self, name))

    @classmethod
    def knobs_read(cls) -> tuple[str, ...]:
        """The knobs this mode reads: its fields named like a `QuantOptions` knob (the base ones included)."""
        return tuple(f.name for f in fields(cls) if f.name in QuantOptions.knobs())

    @classmethod
    def check_fields(cls) -> None:
        """Fail loudly (at registration) on a config field that names no knob: a typo would never be set."""
        unknown = [f.name for f in fields(cls) if f.name != "device" and f.name not in QuantOptions.knobs()]
        if unknown:
            raise TypeError(
                f"{cls.__name__}: field(s) {', '.join(unknown)} name no QuantOptions knob "
                f"({', '.join(QuantOptions.knob_names())}); fixed parameters are ClassVars"
            )

    @classmethod
    def from_options(cls, options: QuantOptions) -> QuantConfig:
        """Every config field named like a `QuantOptions` knob (e.g. `group_size`) takes the user's value."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})

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

    # Calibrated modes (see `CalibratedConfig`) learn from activations before the linears are replaced.
    calibrated: ClassVar[bool] = False

    def calibrate(self, model: nn.Module, sequences: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Calibrated modes: prepare the float model in place from calibration token sequences [n, length].

        Returns (state, details): `state` is everything `apply_calibration` needs to redo the same
        preparation without data (it is what the cache stores); `details` is reported as is."""
        raise NotImplementedError(f"{self.name} is not a calibrated mode")

    def apply_calibration(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Redo `calibrate`'s preparation from its returned state (a cache hit)."""
        raise NotImplementedError(f"{self.name} is not a calibrated mode")


@dataclass(frozen=True)
class CalibratedConfig(QuantConfig):
    """Base of the calibrated modes: they read the calibration knobs and override `calibrate`
    and `apply_calibration`. `quantize_` runs them through `quant.calibration.calibrate`."""

    calibrated: ClassVar[bool] = True
    # Bump when the mode's algorithm changes its result: cached calibrations of older versions are not read.
    algorithm_version: ClassVar[int] = 1

    calibration_file: str = knob_default("calibration_file")
    calibration_tokens: int = knob_default("calibration_tokens")
