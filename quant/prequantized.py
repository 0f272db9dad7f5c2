"""Serve a checkpoint that is already quantized, without building the float model.

Three sources, each in its own module: our own saved format (`quant.saved`, written by
`quantserve-save`), a GGUF's tensors as they are (`quant.gguf_native`, `QS_PRECISION=native`)
and GPTQ/AWQ checkpoints in the Hugging Face layout (`quant.hf_gptq`). Each builds the model's
skeleton with its parameters on the meta device (no float weights are ever allocated), puts
quantized layers in place of the linears and assigns the stored tensors, checked one by one
against the shapes and dtypes the config implies. Any mismatch raises `PrequantizedError`, whose
message is one line naming the file and the tensor; no partial model is returned.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.api import QuantReport, _set_submodule, module_bytes
from quant.layers.base import QuantizedLinear

log = logging.getLogger(__name__)

NATIVE = "native"  # QS_PRECISION value: keep the checkpoint's own quantization (GGUF types, GPTQ/AWQ, saved mode)
SAVED_MANIFEST = "quantserve.json"  # what marks a directory written by `quantserve-save`


class PrequantizedError(RuntimeError):
    """A pre-quantized checkpoint that cannot be served; the message names the file and the tensor."""


@dataclass(frozen=True)
class PrequantizedSource:
    """A checkpoint whose stored quantization is served as is."""

    kind: str  # "saved", "gguf" or "gptq"/"awq"
    path: Path
    stored_precision: str  # the precision label it is served under


def _hf_quantization_method(directory: Path) -> str | None:
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise PrequantizedError(f"{config_file}: not valid JSON ({error})") from None
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    return str(quantization.get("quant_method", "unknown")).lower()


def find_source(model: str, precision: str | None) -> PrequantizedSource | None:
    """The pre-quantized checkpoint `model` names, or None for a float model (quantized at start as before).

    A GGUF is served natively only when `precision` is "native"; a saved or GPTQ/AWQ directory always is.
    """
    from quant.checkpoints import DEFAULT_MODEL, embedded_gguf

    if model == DEFAULT_MODEL:
        if precision != NATIVE:
            return None  # the embedded GGUF is converted to float and quantized, as before
        try:
            path = embedded_gguf()
        except RuntimeError as error:
            raise PrequantizedError(str(error)) from None
    else:
        path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return PrequantizedSource("gguf", path, NATIVE) if precision == NATIVE else None
    if not path.is_dir():
        return None
    manifest = path / SAVED_MANIFEST
    if manifest.is_file():
        from quant.saved import read_manifest

        return PrequantizedSource("saved", path, read_manifest(path)["mode"])
    method = _hf_quantization_method(path)
    if method is not None:
        from quant.hf_gptq import check_quantization_config

        check_quantization_config(path)  # one we cannot serve stops the start here
        return PrequantizedSource(method, path, NATIVE)
    return None


def check_precision(source: PrequantizedSource, requested: str) -> None:
    """A pre-quantized checkpoint serves its own precision: `requested` must be it or "native"."""
    if requested not in (source.stored_precision, NATIVE):
        raise PrequantizedError(
            f"{source.path} is a pre-quantized {source.kind} checkpoint in {source.stored_precision}; "
            f"QS_PRECISION={requested} cannot be applied to it (leave QS_PRECISION unset, or set "
            f"{source.stored_precision} or {NATIVE})"
        )


def load_source(source: PrequantizedSource, cache_dir: Path, device: str) -> tuple[nn.Module, Any, str, QuantReport]:
    """(model, tokenizer, model id, report) of a pre-quantized checkpoint, loaded straight into quantized layers."""
    if device != "cpu":
        raise PrequantizedError(f"{source.path}: pre-quantized checkpoints are served on CPU only (QS_DEVICE=cpu)")
    if source.kind == "saved":
        from quant.saved import load_saved

        return load_saved(source.path)
    if source.kind == "gguf":
        from quant.gguf_native import load_gguf_native

        return load_gguf_native(source.path, cache_dir)
    from quant.hf_gptq import load_hf_quantized

    return load_hf_quantized(source.path)


# --- shared by the three loaders -------------------------------------------------------------


def empty_skeleton(config: Any) -> nn.Module:
    """The model of `config` with its parameters on the meta device (no memory); buffers such as
    RoPE's inverse frequencies are real, computed from the config."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@contextlib.contextmanager
def storage_on_meta() -> Iterator[None]:
    """Layers built here allocate no storage: their buffers are assigned from the checkpoint next (and
    `assign_tensors` chooses their kernels then); the reference kernel they pick for meta tensors goes unlogged."""
    kernels_log = logging.getLogger("quant.kernels")
    level = kernels_log.level
    kernels_log.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            yield
    finally:
        kernels_log.setLevel(level)


def install_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module at its name (quantized layers in place of the skeleton's linears)."""
    for name, module in modules.items():
        _set_submodule(model, name, module)


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Assign every stored tensor to the model, after checking names, shapes and dtypes against it.

    The model's own entries (meta parameters of the skeleton, zero buffers of the new layers) say what the
    config expects; a tensor missing, unexpected, or of another shape or dtype fails with its name.
    """
    expected = model.state_dict(keep_vars=True)
    # A buffer that is not persistent (RoPE's) is computed, never stored.
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise PrequantizedError(
            f"{file}: tensor {missing[0]} is missing ({len(missing)} missing in all); the checkpoint is incomplete"
        )
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise PrequantizedError(f"{file}: tensor {unexpected[0]} is not part of the model the config describes")
    for name, tensor in tensors.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise PrequantizedError(
                f"{file}: tensor {name} has shape {list(tensor.shape)}, the config implies {list(want.shape)}"
            )
        if tensor.dtype != want.dtype:
            raise PrequantizedError(f"{file}: tensor {name} is {tensor.dtype}, expected {want.dtype}")
    model.load_state_dict(tensors, strict=True, assign=True)
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise PrequantizedError(f"{file}: tensor {on_meta[0]} was never loaded")
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.select_kernel()  # for the storage just assigned (dtypes may differ from the constructor's)


def build_report(
    model: nn.Module,
    mode: str,
    *,
    dequantized: list[str],
    compute_dtype: str = "float32",
    bits: float | None = None,
) -> QuantReport:
    """What `quantize_` would report for this model: layers by kernel, bytes, the head, the tensors de-quantized."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    group_sizes = {getattr(m, "group_size", None) for m in layers} - {None}
    report = QuantReport(
        mode=mode,
        backend="torch",
        bits=bits if bits is not None else _mean_bits(layers) if layers else 32,
        group_size=group_sizes.pop() if len(group_sizes) == 1 else None,
        compute_dtype=compute_dtype,
    )
    for layer in layers:
        report.kernels[layer.kernel] = report.kernels.get(layer.kernel, 0) + 1
        report.quantized_layers_bytes += module_bytes(layer)
        report.quantized_layers_fp32_bytes += layer.in_features * layer.out_features * 4
    report.layers_quantized = len(layers)
    report.layers_fallback = len(dequantized)
    report.fallback_examples = dequantized[:3]
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(head, QuantizedLinear):
        shared = model.get_input_embeddings().__class__.__name__ == "Int8G32Embedding"
        report.lm_head = f"{head.kernel_format} (shared with the embedding)" if shared else head.kernel_format
    report.total_weight_bytes = module_bytes(model)
    report.float_bytes = report.total_weight_bytes - report.quantized_layers_bytes
    if dequantized:
        log.warning(
            "%d tensor(s) have no kernel for their stored type and were de-quantized to float, e.g. %s",
            len(dequantized),
            ", ".join(dequantized[:3]),
        )
    log.info(
        "pre-quantized %s: %d quantized layers, %d de-quantized, %.1f MiB of weights",
        mode,
        report.layers_quantized,
        report.layers_fallback,
        report.total_weight_bytes / 2**20,
    )
    return report


def _mean_bits(layers: list[QuantizedLinear]) -> float:
    """Stored bits per weight of the quantized layers (codes, scales and mins together)."""
    weights = sum(m.in_features * m.out_features for m in layers)
    return round(8 * sum(module_bytes(m) for m in layers) / weights, 2)
