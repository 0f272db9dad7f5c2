"""`quantize_(model, config)`: the one entry point that applies a precision mode."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from quant.calibration import CalibrationContext, CalibrationInfo, calibrate
from quant.config import QuantConfig, module_matches
from quant.kernels import REFERENCE
from quant.layers.base import QuantizedLinear
from quant.layers.int8_grouped import Int8G32Embedding, Int8G32Linear

log = logging.getLogger(__name__)

ModuleFilter = Callable[[nn.Module, str], bool]

_FALLBACK_EXAMPLES = 3


@dataclass
class LayerError:
    name: str
    relative_error: float  # ||W - Ŵ||_F / ||W||_F
    sqnr_db: float | None  # 10 log10(||W||² / ||W - Ŵ||²); None when the layer is reproduced exactly

    @property
    def exact(self) -> bool:
        return self.sqnr_db is None


@dataclass
class QuantReport:
    mode: str
    backend: str
    bits: float
    group_size: int | None
    compute_dtype: str
    total_weight_bytes: int = 0
    quantized_layers_bytes: int = 0
    quantized_layers_fp32_bytes: int = 0
    float_bytes: int = 0
    layers_quantized: int = 0
    layers_skipped: int = 0
    layers_fallback: int = 0
    fallback_examples: list[str] = field(default_factory=list)  # the first few fallen-back layers
    kernels: dict[str, int] = field(default_factory=dict)
    lm_head: str = "float"  # what the output head is: "float", a mode's name, or "int8-g32 (shared ...)"
    layer_errors: list[LayerError] = field(default_factory=list)
    calibration: CalibrationInfo | None = None  # calibrated modes: source, tokens, seconds, cache hit
    quantize_seconds: float = 0.0  # calibration (or reading its cache) plus replacing the layers

    @property
    def quantized_ratio(self) -> float | None:
        """Bytes of the quantized layers over what the same layers take in fp32."""
        if not self.quantized_layers_fp32_bytes:
            return None
        return self.quantized_layers_bytes / self.quantized_layers_fp32_bytes

    def error_summary(self) -> dict[str, float | str | int | bool | None]:
        """Mean and worst reconstruction error. JSON-safe: an exact layer has no finite SQNR, so
        `mean_sqnr_db` averages the inexact layers only, `exact_layers` counts the others, and
        `exact` is true (with SQNRs null) when every layer is reproduced exactly."""
        if not self.layer_errors:
            return {"mean_relative_error": None, "mean_sqnr_db": None, "worst_layer": None}
        worst = max(self.layer_errors, key=lambda e: e.relative_error)
        inexact = [e.sqnr_db for e in self.layer_errors if not e.exact]
        n = len(self.layer_errors)
        return {
            "mean_relative_error": sum(e.relative_error for e in self.layer_errors) / n,
            "mean_sqnr_db": sum(inexact) / len(inexact) if inexact else None,
            "exact_layers": n - len(inexact),
            "exact": not inexact,
            "worst_layer": worst.name,
            "worst_relative_error": worst.relative_error,
            "worst_sqnr_db": worst.sqnr_db,
        }

    def summary(self) -> dict:
        """JSON-ready summary (per-layer errors folded into mean and worst)."""
        data = asdict(self)
        data.pop("layer_errors")
        data["quantized_ratio"] = self.quantized_ratio
        data["errors"] = self.error_summary()
        return data


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of distinct storages (a tied weight counts once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def module_bytes(module: nn.Module) -> int:
    """Bytes of the weights a module holds: parameters, buffers, and what quantized layers keep elsewhere."""
    extra = [t for m in module.modules() if isinstance(m, QuantizedLinear) for t in m.extra_tensors()]
    return tensor_bytes([*module.parameters(), *module.buffers(), *extra])


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """nn.Linear as is; transformers' Conv1D (weight stored [in, out]) as an equivalent Linear."""
    if isinstance(module, nn.Linear):
        return module
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight.detach()
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device=weight.device)
        linear.weight.data = weight.t().contiguous()
        if module.bias is not None:
            linear.bias.data = module.bias.detach().clone()
        return linear
    return None


def _layer_error(name: str, weight: torch.Tensor, approx: torch.Tensor) -> LayerError:
    w = weight.detach().float()
    diff = (w - approx.float().to(w.device)).pow(2).sum().item()
    energy = w.pow(2).sum().item()
    rel = math.sqrt(diff / energy) if energy else 0.0
    sqnr = 10 * math.log10(energy / diff) if diff else None  # JSON has no Infinity
    return LayerError(name, rel, sqnr)


def _is_tied_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is not module:
        return False
    emb = get_in()
    return emb is not None and emb.weight.data_ptr() == module.weight.data_ptr()


def _tied_head_policy(config: QuantConfig, head: nn.Linear) -> str:
    """How `quantize_` treats a tied output head: "int8-g32", "mode" (the mode's own layer) or "float"."""
    if config.quantize_lm_head == "true":
        return "mode"
    if config.quantize_lm_head == "auto" and config.device == "cpu" and Int8G32Linear.supports(head.in_features):
        return "int8-g32"
    return "float"


def _kernel_name(layer: nn.Module) -> str:
    """The name of the kernel object `layer` holds, which is the one its forward calls."""
    if isinstance(layer, QuantizedLinear):
        return layer.linear_kernel.name
    return REFERENCE  # a mode's own module outside the QuantizedLinear family: plain torch


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: ModuleFilter | None = None,
    *,
    measure_error: bool = True,
    calibration: CalibrationContext | None = None,
) -> QuantReport:
    """Apply `config` to `model` in place and report what it did.

    Float modes cast the whole model. Other modes replace every nn.Linear and
    GPT-2 Conv1D that passes `filter_fn(module, name)` and is not matched by
    `config.skip_modules`. The tied output head follows `config.quantize_lm_head`:
    "auto" makes it int8 with a scale per 32 inputs (llama.cpp's Q8_0 layout, as llama.cpp
    stores the head of such models) when the model runs on CPU, and the input embedding then
    reads the same table, so the model keeps one copy; "true" unties it and applies the mode;
    "false" (and "auto" off CPU) keeps it float.

    A calibrated mode first prepares the float model from calibration text (`calibration` gives
    the tokenizer and the cache), or from its cached result.
    """
    started = time.perf_counter()
    config.check_available()
    compute_dtype = config.compute_dtype()
    report = QuantReport(
        mode=config.name,
        backend=config.backend,
        bits=config.bits,
        group_size=config.group_size_label(),
        compute_dtype=str(compute_dtype).removeprefix("torch."),
    )
    if not config.replaces_linears:
        model.to(compute_dtype)
    else:
        model.to(compute_dtype)
        if config.calibrated:
            report.calibration = calibrate(model, config, calibration)
        _replace_linears(model, config, filter_fn, report, measure_error)
        if report.layers_fallback:
            log.warning(
                "%s: %d layer(s) fell back to float (shape not supported by the mode), e.g. %s",
                config.name,
                report.layers_fallback,
                ", ".join(report.fallback_examples),
            )
    report.total_weight_bytes = module_bytes(model)
    report.float_bytes = report.total_weight_bytes - report.quantized_layers_bytes
    report.quantize_seconds = time.perf_counter() - started
    log.info(
        "precision %s: %d quantized, %d skipped, %d fallback, %.1f MiB of weights",
        config.name,
        report.layers_quantized,
        report.layers_skipped,
        report.layers_fallback,
        report.total_weight_bytes / 2**20,
    )
    return report


def _replace_linears(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: ModuleFilter | None,
    report: QuantReport,
    measure_error: bool,
) -> None:
    quantized_prefixes: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            quantized_prefixes.append(name + ".")  # e.g. bitsandbytes' own Linear inside a wrapper
            continue
        linear = _as_linear(module)
        if linear is None or name.startswith(tuple(quantized_prefixes)):
            continue
        tied_head = _is_tied_head(model, name, module)
        head_policy = _tied_head_policy(config, linear) if tied_head else "mode"
        if (
            (filter_fn is not None and not filter_fn(module, name))
            or module_matches(name, config.skip_modules)
            or head_policy == "float"
        ):
            report.layers_skipped += 1
            continue
        new = Int8G32Linear.from_linear(linear) if head_policy == "int8-g32" else config.quantize_linear(linear)
        if new is None:
            report.layers_fallback += 1
            if len(report.fallback_examples) < _FALLBACK_EXAMPLES:
                report.fallback_examples.append(name)
            continue
        new.train(module.training)
        if tied_head:
            model.config.tie_word_embeddings = False  # the head is now its own (quantized) tensor
            if head_policy == "int8-g32":
                model.set_input_embeddings(Int8G32Embedding(new))  # reads the head's table: one copy
            report.lm_head = (
                f"{new.kernel_format} (shared with the embedding)" if head_policy == "int8-g32" else config.name
            )
        _set_submodule(model, name, new)
        report.layers_quantized += 1
        report.quantized_layers_bytes += module_bytes(new)
        report.quantized_layers_fp32_bytes += linear.weight.numel() * 4 + (
            linear.bias.numel() * 4 if linear.bias is not None else 0
        )
        kernel = _kernel_name(new)
        report.kernels[kernel] = report.kernels.get(kernel, 0) + 1
        if measure_error and hasattr(new, "dequantize_weight"):
            report.layer_errors.append(_layer_error(name, linear.weight, new.dequantize_weight()))
