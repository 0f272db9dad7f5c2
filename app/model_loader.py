"""Load the served model (via `quant.checkpoints`) and apply the precision mode.

`load_model` builds ONE mode (`settings.precision` is a single mode here). Several modes
in one process (`app.modes`) load the float model once (`load_float`) and pass a copy of
it to `load_model` per mode."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import quant
from app.settings import Settings
from quant.calibration import CalibrationContext
from quant.checkpoints import load_float_model
from quant.kernels import configure as configure_kernels
from quant.prequantized import check_precision, find_source, load_source

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    model_id: str
    device: torch.device
    report: quant.QuantReport
    load_seconds: float


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("QS_DEVICE=cuda but no CUDA device is available")
    return torch.device(choice)


@dataclass
class FloatModel:
    """The float32 checkpoint as loaded, before any mode touches it: what each mode is built from."""

    model: nn.Module
    tokenizer: Any
    model_id: str


def load_float(settings: Settings) -> FloatModel:
    device = resolve_device(settings.device)
    return FloatModel(*load_float_model(settings.model, settings.cache_dir, device.type))


def load_model(settings: Settings, base: FloatModel | None = None, copy_base: bool = True) -> LoadedModel:
    """Build one precision mode: a pre-quantized checkpoint as stored; else from `base` when given (a copy
    of it, so it stays float, unless `copy_base` is false: the last mode built from it takes it), else
    from a fresh load of the float model."""
    started = time.perf_counter()
    device = resolve_device(settings.device)
    configure_kernels(kernels=settings.kernels, isa=settings.kernel_isa)
    source = find_source(settings.model, settings.precision)
    if source is not None:  # already quantized: load it straight into the quantized layers
        check_precision(source, settings.precision)
        model, tokenizer, model_id, report = load_source(source, settings.cache_dir, device.type)
        return LoadedModel(model, tokenizer, model_id, device, report, time.perf_counter() - started)
    config = quant.make_config(settings.precision, settings.quant_options(device.type))
    config.check_available()  # fail before spending time on loading
    if base is None:
        model, tokenizer, model_id = load_float_model(settings.model, settings.cache_dir, device.type)
    else:
        model = copy.deepcopy(base.model) if copy_base else base.model
        tokenizer, model_id = base.tokenizer, base.model_id
    calibration = CalibrationContext(tokenizer, model_id, settings.cache_dir)  # read by calibrated modes only
    report = quant.quantize_(model, config, calibration=calibration)
    return LoadedModel(model, tokenizer, model_id, device, report, time.perf_counter() - started)


def kv_cache_bytes(model: nn.Module, slots: int, max_len: int, bytes_per_value: int = 4) -> int:
    """Bytes of a static K and V cache for `slots` sequences of `max_len` tokens (float32 by default,
    what the native and lean runners keep)."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * slots * kv_heads * max_len * head_dim * bytes_per_value


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids
