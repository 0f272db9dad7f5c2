"""Quantization: primitives, quantized layers, precision modes and their registry.

Public entry points: `quantize_(model, config)`, `make_config(name, options)`,
`list_modes()`, `REFERENCE_MODE`. Nothing here imports the service (`app`).
"""

from quant.api import QuantReport, module_bytes, quantize_
from quant.config import ModeUnavailableError, QuantConfig, QuantOptions
from quant.registry import REFERENCE_MODE, get_mode, list_modes, make_config, register_mode

__all__ = [
    "REFERENCE_MODE",
    "ModeUnavailableError",
    "QuantConfig",
    "QuantOptions",
    "QuantReport",
    "get_mode",
    "list_modes",
    "make_config",
    "module_bytes",
    "quantize_",
    "register_mode",
]
