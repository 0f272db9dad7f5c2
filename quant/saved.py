"""Our own pre-quantized format: a directory `quantserve-save` writes and `QS_MODEL=DIR` serves.

    model.safetensors   every tensor of the quantized model, in our storage formats (a tensor two
                        modules share, e.g. the int8 g32 head and the embedding reading it, once)
    config.json, generation_config.json, tokenizer files   as `save_pretrained` writes them
    quantserve.json     mode, knobs, calibration, the module that replaced each linear (class and
                        constructor arguments), shared tensors, the weights' SHA-256, the QuantReport

Loading builds the model's skeleton on the meta device, puts those modules in place and assigns the
stored tensors (`quant.prequantized`): no float weight is ever allocated.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.api import QuantReport
from quant.config import QuantOptions
from quant.layers.base import QuantizedLinear
from quant.layers.fp8 import Fp8WeightOnlyLinear
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.layers.int8 import Int8DynamicLinear, Int8WeightOnlyLinear
from quant.layers.int8_grouped import Int8G32Embedding, Int8G32Linear
from quant.layers.int8_mixed import Int8MixedLinear
from quant.layers.int8_static import Int8StaticLinear
from quant.layers.nf4 import NF4Linear
from quant.prequantized import (
    SAVED_MANIFEST,
    PrequantizedError,
    assign_tensors,
    build_report,
    empty_skeleton,
    install_modules,
    storage_on_meta,
)

FORMAT = "quantserve"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
EMBEDDING_CLASS = "Int8G32Embedding"

# The layers whose whole state is their buffers and constructor arguments (bitsandbytes' are not).
SAVABLE_LAYERS: dict[str, type[QuantizedLinear]] = {
    cls.__name__: cls
    for cls in (
        Int4WeightOnlyLinear,
        Int8WeightOnlyLinear,
        Int8DynamicLinear,
        Int8StaticLinear,
        Int8MixedLinear,
        Int8G32Linear,
        NF4Linear,
        Fp8WeightOnlyLinear,
    )
}
_SHAPE_ARGUMENTS = ("self", "in_features", "out_features", "bias")


def _constructor_arguments(layer: QuantizedLinear) -> dict[str, Any]:
    """The layer's constructor arguments beyond its shape (group size, block size, format, threshold)."""
    names = [p for p in inspect.signature(type(layer).__init__).parameters if p not in _SHAPE_ARGUMENTS]
    return {name: getattr(layer, name) for name in names}


def _module_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What replaced each linear (and the embedding that reads the head's table), by module name."""
    specs: dict[str, dict[str, Any]] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            cls_name = type(module).__name__
            if SAVABLE_LAYERS.get(cls_name) is not type(module):
                raise ValueError(f"layer {name} ({cls_name}) cannot be saved: its state is not in its buffers")
            specs[name] = {
                "class": cls_name,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
                "arguments": _constructor_arguments(module),
            }
            if isinstance(module, Int8G32Linear):
                owners[module.weight_int8.data_ptr()] = name
    for name, module in model.named_modules():
        if isinstance(module, Int8G32Embedding):
            specs[name] = {"class": EMBEDDING_CLASS, "head": owners[module.weight_int8.data_ptr()]}
    return specs


def _distinct_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors stored once, {name: the stored name it shares}) of the model's state dict."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    report: QuantReport,
    out: Path,
    *,
    options: QuantOptions,
    source_model: str,
    model_id: str,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Write the quantized `model` (as `quantize_` or a pre-quantized loader left it) to directory `out`."""
    from safetensors.torch import save_file

    specs = _module_specs(model)
    tensors, aliases = _distinct_tensors(model)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_file(tensors, str(weights), metadata={"format": FORMAT})
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    options_json = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "mode": report.mode,
        "compute_dtype": report.compute_dtype,
        "options": options_json,
        "calibration": calibration,
        "source_model": source_model,
        "model_id": model_id,
        "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(weights)},
        "modules": specs,
        "aliases": aliases,
        "report": report.summary(),
    }
    (out / SAVED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / SAVED_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PrequantizedError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PrequantizedError(f'{path}: not a {FORMAT} manifest (no "format": "{FORMAT}")')
    if manifest.get("version") != FORMAT_VERSION:
        raise PrequantizedError(
            f"{path}: format version {manifest.get('version')!r}, this build reads {FORMAT_VERSION}"
        )
    for key in ("mode", "compute_dtype", "weights", "modules", "aliases"):
        if key not in manifest:
            raise PrequantizedError(f"{path}: the manifest has no {key!r}")
    return manifest


def _build_layer(name: str, spec: dict[str, Any], skeleton: nn.Module, manifest_path: Path) -> QuantizedLinear:
    cls = SAVABLE_LAYERS.get(spec.get("class", ""))
    if cls is None:
        raise PrequantizedError(f"{manifest_path}: module {name} has unknown layer class {spec.get('class')!r}")
    try:
        target = skeleton.get_submodule(name)
    except AttributeError:
        raise PrequantizedError(
            f"{manifest_path}: module {name} is not part of the model config.json describes"
        ) from None
    shape = (getattr(target, "in_features", None), getattr(target, "out_features", None))
    if shape != (spec["in_features"], spec["out_features"]):
        raise PrequantizedError(
            f"{manifest_path}: module {name} is {spec['in_features']}->{spec['out_features']}, "
            f"config.json implies {shape[0]}->{shape[1]}"
        )
    try:
        with storage_on_meta():
            return cls(spec["in_features"], spec["out_features"], spec["bias"], **spec["arguments"])
    except (TypeError, ValueError) as error:
        raise PrequantizedError(f"{manifest_path}: module {name}: {error}") from None


def read_weights(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is truncated, corrupt or altered fails naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise PrequantizedError(f"{path}: the weights file is missing")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise PrequantizedError(f"{path}: SHA-256 differs from the manifest's (truncated, corrupt or altered file)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise PrequantizedError(f"{path}: not a readable safetensors file ({error})") from None


def load_saved(directory: Path) -> tuple[nn.Module, Any, str, QuantReport]:
    """(model, tokenizer, model id, report) of a `quantserve-save` directory."""
    from transformers import AutoConfig, AutoTokenizer

    manifest_path = directory / SAVED_MANIFEST
    manifest = read_manifest(directory)
    model = empty_skeleton(AutoConfig.from_pretrained(directory))
    model.to(getattr(torch, manifest["compute_dtype"]))  # a float mode's model is cast as a whole
    specs: dict[str, dict[str, Any]] = manifest["modules"]
    layers = {
        name: _build_layer(name, spec, model, manifest_path)
        for name, spec in specs.items()
        if spec.get("class") != EMBEDDING_CLASS
    }
    install_modules(model, layers)
    for name, spec in specs.items():
        if spec.get("class") == EMBEDDING_CLASS:
            head = layers.get(spec.get("head", ""))
            if not isinstance(head, Int8G32Linear):
                raise PrequantizedError(
                    f"{manifest_path}: embedding {name} reads {spec.get('head')!r}, no int8 g32 head"
                )
            install_modules(model, {name: Int8G32Embedding(head)})
    weights_path = directory / manifest["weights"]["file"]
    tensors = read_weights(weights_path, manifest["weights"].get("sha256"))
    for alias, stored in manifest["aliases"].items():
        if stored not in tensors:
            raise PrequantizedError(f"{weights_path}: tensor {stored} (shared by {alias}) is missing")
        tensors[alias] = tensors[stored]
    assign_tensors(model, tensors, weights_path)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    saved_report = manifest.get("report") or {}
    report = build_report(
        model, manifest["mode"], dequantized=[], compute_dtype=manifest["compute_dtype"], bits=saved_report.get("bits")
    )
    report.layers_skipped = saved_report.get("layers_skipped", 0)
    model_id = manifest.get("model_id") or directory.name
    return model, tokenizer, f"{model_id} ({manifest['mode']}, saved)", report
