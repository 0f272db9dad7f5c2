"""Calibration data for the calibrated modes, and the cache of what calibration produced.

A calibrated mode (`QuantConfig.calibrated`) learns something from real activations before
its weights are quantized: GPTQ's updated weights, AWQ's scales, static activation scales.
`quantize_` hands it fixed-length token sequences cut from a text:
- the user's file (`QS_CALIBRATION_FILE`, UTF-8), or by default Python's own
  `pydoc_data.topics`, real English that every Python install has;
- `QS_CALIBRATION_TOKENS` tokens of it, in sequences of `SEQUENCE_LENGTH`.

A bad source (missing or empty file, a budget larger than the text) is an error naming the
variable, never a silent fall-back to another text. What calibration produced is cached
under `QS_CACHE_DIR`, keyed by model, mode, options, text and budget, so a second start
costs what a round-to-nearest start costs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from quant.config import QuantConfig

log = logging.getLogger(__name__)

SEQUENCE_LENGTH = 512
DEFAULT_TOKENS = 64 * SEQUENCE_LENGTH
DEFAULT_SOURCE = "pydoc_data.topics"
_CACHE_VERSION = 1  # bump when a mode's cached state changes meaning


class CalibrationError(ValueError):
    """The calibration source cannot be used; the message is one line naming the variable."""


def read_calibration_text(path: str) -> tuple[str, str]:
    """(text, label) of the calibration source: `path`, or Python's `pydoc_data.topics` when empty."""
    if not path:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics)), DEFAULT_SOURCE
    file = Path(path).expanduser()
    if not file.is_file():
        raise CalibrationError(f"QS_CALIBRATION_FILE: {path!r} is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CalibrationError(f"QS_CALIBRATION_FILE: {path!r} is not UTF-8 text ({error.reason})") from None
    if not text.strip():
        raise CalibrationError(f"QS_CALIBRATION_FILE: {path!r} is empty")
    return text, str(file.resolve())


def calibration_sequences(
    tokenizer: Any, text: str, budget: int, sequence_length: int = SEQUENCE_LENGTH, label: str = "the text"
) -> torch.Tensor:
    """`budget` tokens of `text` as a [n, sequence_length] int64 tensor (the last sequence may be shorter
    only when the budget is below one sequence). Raises CalibrationError when the text is too short."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if budget > len(ids):
        raise CalibrationError(
            f"QS_CALIBRATION_TOKENS: {budget} tokens asked, but {label} has only {len(ids)}; "
            "lower the budget or give a longer QS_CALIBRATION_FILE"
        )
    length = min(sequence_length, budget)
    count = budget // length
    return torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)


@dataclass(frozen=True)
class CalibrationContext:
    """What `quantize_` needs besides the model to calibrate: the tokenizer, a stable name of the
    model for the cache key, and the cache directory (None: no cache)."""

    tokenizer: Any
    model_key: str
    cache_dir: Path | None = None


@dataclass
class CalibrationInfo:
    """What `/info` and the quality tools report about a calibration."""

    source: str
    tokens: int
    sequences: int
    seconds: float  # calibration time; on a cache hit, the time of the original run
    cached: bool  # this start read the result from the cache
    load_seconds: float = 0.0  # time to read the cached result
    details: dict[str, Any] = field(default_factory=dict)  # mode-specific (e.g. GPTQ's damping)


def _config_options(config: QuantConfig) -> dict[str, Any]:
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    values.pop("device", None)
    return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


def cache_key(config: QuantConfig, context: CalibrationContext, text: str, budget: int) -> str:
    """Model, mode, options, the text's content and the budget: anything that changes the result."""
    payload = json.dumps(
        {
            "version": _CACHE_VERSION,
            "model": context.model_key,
            "mode": config.name,
            "algorithm": getattr(config, "algorithm_version", 0),
            "options": _config_options(config),
            "text": hashlib.sha256(text.encode()).hexdigest(),
            "tokens": budget,
            "sequence_length": SEQUENCE_LENGTH,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _entry(cache_dir: Path, config: QuantConfig, key: str) -> Path:
    return cache_dir / "calibrated" / f"{config.name}-{key}"


def _load_entry(entry: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    from safetensors.torch import load_file

    try:
        meta = json.loads((entry / "info.json").read_text())
        return load_file(entry / "state.safetensors"), meta
    except (OSError, ValueError) as error:  # a damaged entry is recomputed, not served
        log.warning("ignoring unreadable calibration cache %s: %s", entry, error)
        return None


def _save_entry(entry: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    partial = entry.with_name(entry.name + f".partial-{time.time_ns()}")
    partial.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, partial / "state.safetensors")
    (partial / "info.json").write_text(json.dumps(meta, indent=1, default=str))
    try:
        partial.rename(entry)  # atomic: a crash never leaves a half-written entry
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)


def calibrate(model: nn.Module, config: QuantConfig, context: CalibrationContext | None) -> CalibrationInfo:
    """Run `config.calibrate` on the model (or apply its cached result) before the linears are replaced."""
    if context is None:
        raise CalibrationError(f"{config.name} is a calibrated mode: it needs a tokenizer and calibration text")
    budget = config.calibration_tokens  # type: ignore[attr-defined]
    text, label = read_calibration_text(config.calibration_file)  # type: ignore[attr-defined]
    entry = None
    if context.cache_dir is not None:
        entry = _entry(context.cache_dir, config, cache_key(config, context, text, budget))
        if entry.is_dir():
            started = time.perf_counter()
            hit = _load_entry(entry)
            if hit is not None:
                state, meta = hit
                config.apply_calibration(model, state)
                info = CalibrationInfo(**{**meta, "cached": True, "load_seconds": time.perf_counter() - started})
                log.info("%s: calibration read from the cache (%s)", config.name, entry)
                return info
    sequences = calibration_sequences(context.tokenizer, text, budget, label=label)
    log.info("%s: calibrating on %d tokens of %s", config.name, sequences.numel(), label)
    started = time.perf_counter()
    state, details = config.calibrate(model, sequences)
    info = CalibrationInfo(
        label, sequences.numel(), sequences.shape[0], time.perf_counter() - started, False, 0.0, details
    )
    log.info("%s: calibrated in %.1f s", config.name, info.seconds)
    if entry is not None:
        meta = {k: v for k, v in info.__dict__.items() if k not in ("cached", "load_seconds")}
        _save_entry(entry, state, meta)
    return info
