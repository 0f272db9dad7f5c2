"""Load the served model (via `quant.checkpoints`) and apply the precision mode."""

from __future__ import annotations

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


def load_model(settings: Settings) -> LoadedModel:
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
    model, tokenizer, model_id = load_float_model(settings.model, settings.cache_dir, device.type)
    calibration = CalibrationContext(tokenizer, model_id, settings.cache_dir)  # read by calibrated modes only
    report = quant.quantize_(model, config, calibration=calibration)
    return LoadedModel(model, tokenizer, model_id, device, report, time.perf_counter() - started)


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids
