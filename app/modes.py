"""Several precision modes in one process: building them from one float load, and the memory budget.

`QS_PRECISION=int4,int8,fp32` serves three modes; the first is the default. The float model
is loaded once (`ModeLoader`), and each mode is built from a copy of it by
`app.model_loader.load_model`, one call per mode. A mode named only by QS_SHADOW_REFERENCE
is built too, without an engine: it scores, it does not serve.

Start-up refuses, in one line, a set of modes whose weights plus KV caches exceed
QS_MAX_MEMORY (default: 80% of the memory available at start-up). Each mode is checked as
soon as its weights are known, before its KV cache is allocated and before the next mode
is built, so a refused set never holds more than one mode beyond the budget.

Clients name a mode per request: OpenAI's `model` as `<model-id>:<mode>` (a bare name means
the default), TGI's `precision` parameter (`resolve_precision`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.engine.engine import Engine
from app.errors import InputValidationError
from app.metrics import ServiceMetrics
from app.model_loader import FloatModel, LoadedModel, kv_cache_bytes, load_float, load_model
from app.settings import Settings

# Share of the available memory the modes may take when QS_MAX_MEMORY is unset: the rest is the
# interpreter, torch, activations and the native step's repacked weights.
DEFAULT_MEMORY_SHARE = 0.8
GIB = 1024**3


class MemoryBudgetExceeded(RuntimeError):
    """The modes' weights plus KV caches do not fit QS_MAX_MEMORY; the message is one line."""


@dataclass
class ModeMemory:
    """What start-up counted for each mode against the budget."""

    budget: int
    counted: dict[str, tuple[int, int]] = field(default_factory=dict)  # mode -> (weight bytes, KV cache bytes)

    @property
    def total(self) -> int:
        return sum(weights + cache for weights, cache in self.counted.values())

    def add(self, precision: str, weight_bytes: int, cache_bytes: int, wanted: tuple[str, ...]) -> None:
        """Count one mode; raise MemoryBudgetExceeded when the set no longer fits."""
        self.counted[precision] = (weight_bytes, cache_bytes)
        if self.total <= self.budget:
            return
        parts = ", ".join(
            f"{p} {(w + c) / GIB:.2f} GiB (weights {w / GIB:.2f} + KV {c / GIB:.2f})"
            for p, (w, c) in self.counted.items()
        )
        left = [p for p in wanted if p not in self.counted]
        rest = f", before {', '.join(left)} were even counted" if left else ""
        raise MemoryBudgetExceeded(
            f"QS_MAX_MEMORY is {self.budget / GIB:.2f} GiB but the modes {','.join(wanted)} need "
            f"{self.total / GIB:.2f} GiB or more ({parts}{rest}); serve fewer modes, lower QS_MAX_BATCH_SIZE or "
            f"QS_MAX_TOTAL_TOKENS, or raise QS_MAX_MEMORY"
        )


def available_memory() -> int:
    """Bytes of memory available now: MemAvailable on Linux (what can be had without swapping), else free pages."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(settings: Settings) -> int:
    if settings.max_memory is not None:
        return int(settings.max_memory)
    return int(available_memory() * DEFAULT_MEMORY_SHARE)


def modes_to_build(settings: Settings) -> tuple[str, ...]:
    """The served modes, then the shadow reference when it is not one of them."""
    reference = settings.shadow_reference if settings.shadowing else None
    extra = (reference,) if reference is not None and reference not in settings.precisions else ()
    return (*settings.precisions, *extra)


class ModeLoader:
    """`load_model` for each mode of a set, from one float load: a copy for every mode but the last,
    which takes the float model itself. With a single mode, exactly `load_model(settings)`."""

    def __init__(self, modes: int) -> None:
        self._left = modes
        self._source: FloatModel | None = None

    def __call__(self, settings: Settings) -> LoadedModel:
        self._left -= 1
        if self._source is None and self._left <= 0:
            return load_model(settings)
        if self._source is None:
            self._source = load_float(settings)
        if self._left > 0:
            return load_model(settings, self._source)
        source, self._source = self._source, None
        return load_model(settings, source, copy_base=False)


def mode_cache_bytes(loaded: LoadedModel, settings: Settings) -> int:
    """KV cache bytes a served mode's runner allocates (an upper bound: float32)."""
    try:
        return kv_cache_bytes(loaded.model, settings.batch_slots, settings.max_total_tokens)
    except AttributeError:  # a model without the usual config fields: its runner's cache grows as it goes
        return 0


def resolve_precision(requested: str | None, served: tuple[str, ...], how: str) -> str:
    """The mode a request names (None: the default, the first served); 422 with the accepted list otherwise."""
    if requested is None or requested == "":
        return served[0]
    if requested not in served:
        raise InputValidationError(f"{how} {requested!r} is not served here; accepted: {', '.join(served)}")
    return requested


def openai_model_names(model_name: str, served: tuple[str, ...]) -> list[str]:
    """What /v1/models lists: `<model-id>:<mode>` for each served mode, the default first."""
    return [f"{model_name}:{precision}" for precision in served]


def precision_of_model_field(model: str | None, model_name: str, served: tuple[str, ...]) -> str:
    """OpenAI's `model`: `<model-id>:<mode>` names a mode; a bare name (any, as before) means the default."""
    if model is None or ":" not in model:
        return served[0]
    _, _, precision = model.rpartition(":")
    if precision not in served:
        accepted = ", ".join([model_name, *openai_model_names(model_name, served)])
        raise InputValidationError(f"model {model!r} names no served mode; accepted: {accepted}")
    return precision


@dataclass
class ServedMode:
    """One mode of the process: its model, and its engine when it serves (a reference-only mode has none)."""

    precision: str
    loaded: LoadedModel
    metrics: ServiceMetrics
    engine: Engine | None = None
    runner: str | None = None  # the decode path: "native", "lean" or "transformers"
    ready_seconds: float = 0.0

    def describe(self, default: bool) -> dict[str, Any]:
        """This mode's entry in /info."""
        report = self.loaded.report
        data: dict[str, Any] = {
            "precision": self.precision,
            "default": default,
            "served": self.engine is not None,
            "backend": report.backend,
            "kernels": report.kernels,
            "runner": self.runner,
            "lm_head": report.lm_head,
            "compute_dtype": report.compute_dtype,
            "weight_bytes": report.total_weight_bytes,
            "quantization": report.summary(),
            "load_seconds": round(self.loaded.load_seconds, 3),
        }
        if self.engine is not None:
            running, waiting = self.engine.stats()
            data["scheduler"] = {"running": running, "waiting": waiting}
        return data
