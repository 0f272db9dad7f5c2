"""GPTQ and AWQ checkpoints in the Hugging Face layout, served on our int4 storage.

Such a checkpoint is an HF directory whose `config.json` has a `quantization_config`, and whose
quantized linears are stored as (from the formats' documentation: AutoGPTQ / GPTQModel, AutoAWQ):

| tensor | GPTQ (`quant_method: gptq`) | AWQ GEMM (`quant_method: awq`, `version: gemm`) |
|---|---|---|
| `qweight` int32 | [in / 8, out]: input k = 8i + j in bits 4j..4j+3 of row i | [in, out / 8]: output 8c + `AWQ_ORDER[j]` in bits 4j.. of column c |
| `qzeros` int32 | [groups, out / 8]: output 8c + j in bits 4j..; AutoGPTQ (`checkpoint_format: gptq`) stores zero − 1, GPTQModel's `gptq_v2` the zero | [groups, out / 8], packed as `qweight` |
| `scales` | [groups, out] float16 | [groups, out] float16 |
| `g_idx` int32 | [in]: the group of each input (act-order permutes it) | - |

and w[n, k] = scales[g, n] · (q[k, n] − zero[g, n]) with g = g_idx[k] (GPTQ) or k // group_size (AWQ).

Our int4 storage keeps w = code · scale + min per contiguous group, so min = −zero · scale. That is
exact in float32 (a 4-bit integer times a float16); when it is also exact in float16 (always for
symmetric GPTQ, zero 8) the layer stores float16 mins and runs our int4 kernels, otherwise it keeps
float32 mins and runs the reference (de-quantize, float GEMM) path, logged. Weights whose groups are
not contiguous (GPTQ act-order) are de-quantized to a float linear, logged and counted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.api import QuantReport
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.prequantized import (
    NATIVE,
    PrequantizedError,
    assign_tensors,
    build_report,
    empty_skeleton,
    install_modules,
    storage_on_meta,
)
from quant.primitives import pack_int4

log = logging.getLogger(__name__)

BITS = 4
PACK = 32 // BITS  # codes per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: bits 4j..4j+3 of a word hold output 8c + AWQ_ORDER[j]
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ's qweight [in / 8, out] int32 -> codes [in, out]: row i holds inputs 8i..8i+7, 4 bits each."""
    codes = (qweight[:, None, :] >> _SHIFTS[None, :, None]) & 0xF  # [in / 8, 8, out]
    return codes.reshape(-1, qweight.shape[1]).to(torch.uint8)


def unpack_columns(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(PACK))) -> torch.Tensor:
    """[rows, out / 8] int32 -> [rows, out]: bits 4j.. of column c hold output 8c + order[j]."""
    nibbles = (packed[:, :, None] >> _SHIFTS[None, None, :]) & 0xF  # [rows, out / 8, 8], nibble j
    codes = torch.empty_like(nibbles)
    codes[:, :, list(order)] = nibbles
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def _config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def check_quantization_config(directory: Path) -> dict[str, Any]:
    """The `quantization_config`, if we can serve it; otherwise one line saying why, naming the file."""
    file = directory / "config.json"
    qc = _config(directory)["quantization_config"]
    method = str(qc.get("quant_method", "")).lower()
    reasons = []
    if method not in ("gptq", "awq"):
        reasons.append(f"quant_method {method!r} (served: gptq, awq)")
    if qc.get("bits") != BITS:
        reasons.append(f"bits {qc.get('bits')!r} (served: 4)")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        reasons.append(f"AWQ version {qc.get('version')!r} (served: gemm)")
    if method == "awq" and not qc.get("zero_point", True):
        reasons.append("AWQ without zero points")
    if method == "gptq" and qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        reasons.append(f"checkpoint_format {qc.get('checkpoint_format')!r} (served: gptq, gptq_v2)")
    group_size = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        reasons.append(f"group_size {group_size!r}")
    if reasons:
        raise PrequantizedError(f"{file}: quantization_config cannot be served: {'; '.join(reasons)}")
    return {**qc, "quant_method": method, "group_size": group_size}


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of the directory's safetensors files (one file or shards), with the file each came from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise PrequantizedError(f"{directory}: no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as error:
            raise PrequantizedError(f"{file}: not a readable safetensors file ({error})") from None
        tensors.update(loaded)
        origin.update(dict.fromkeys(loaded, file))
    return tensors, origin


def _expect(tensor: torch.Tensor | None, name: str, shape: tuple[int, ...], origin: dict[str, Path], d: Path) -> None:
    where = origin.get(name, d)
    if tensor is None:
        raise PrequantizedError(f"{where}: tensor {name} is missing")
    if tuple(tensor.shape) != shape:
        raise PrequantizedError(
            f"{where}: tensor {name} has shape {list(tensor.shape)}, the config implies {list(shape)}"
        )


def dequantize_reference(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor):
    """w [out, in] = scales[g, n] · (q[k, n] − zero[g, n]), g = g_idx[k]: the formats' own definition."""
    return ((codes.float() - zeros[g_idx].float()) * scales[g_idx].float()).t().contiguous()


def _quantized_linear(
    name: str, linear: nn.Linear, qc: dict[str, Any], tensors: dict[str, torch.Tensor], origin, directory: Path
) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    """(module, its state, "kernels" | "reference" | "dequantized") for the packed linear at `name`."""
    n_out, n_in = linear.out_features, linear.in_features
    group = n_in if qc["group_size"] == -1 else qc["group_size"]
    if n_in % group or n_out % PACK or n_in % PACK:
        raise PrequantizedError(
            f"{directory}: {name} ({n_in}->{n_out}) does not fit group size {group} and 4-bit packing"
        )
    groups = n_in // group
    qweight, qzeros, scales = (tensors.pop(f"{name}.{k}", None) for k in ("qweight", "qzeros", "scales"))
    if qc["quant_method"] == "gptq":
        _expect(qweight, f"{name}.qweight", (n_in // PACK, n_out), origin, directory)
        codes = unpack_rows(qweight)
        g_idx = tensors.pop(f"{name}.g_idx", None)
        if g_idx is None:
            g_idx = torch.arange(n_in, dtype=torch.int32) // group
        _expect(g_idx, f"{name}.g_idx", (n_in,), origin, directory)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise PrequantizedError(
                f"{origin.get(name + '.g_idx', directory)}: tensor {name}.g_idx names a group out of 0..{groups - 1}"
            )
        order = tuple(range(PACK))
        zero_offset = 1 if qc.get("checkpoint_format", "gptq") == "gptq" else 0  # AutoGPTQ stores zero - 1
    else:
        _expect(qweight, f"{name}.qweight", (n_in, n_out // PACK), origin, directory)
        codes = unpack_columns(qweight, AWQ_ORDER)
        g_idx = torch.arange(n_in) // group
        order, zero_offset = AWQ_ORDER, 0
    _expect(qzeros, f"{name}.qzeros", (groups, n_out // PACK), origin, directory)
    _expect(scales, f"{name}.scales", (groups, n_out), origin, directory)
    zeros = unpack_columns(qzeros, order).to(torch.int16) + zero_offset
    bias = tensors.pop(f"{name}.bias", None)
    state: dict[str, torch.Tensor] = {}
    if not torch.equal(g_idx.long(), torch.arange(n_in) // group):  # act-order: groups are not contiguous
        dense = nn.Linear(n_in, n_out, bias=bias is not None, device="meta")
        state["weight"] = dequantize_reference(codes, zeros, scales, g_idx.long())
        if bias is not None:
            state["bias"] = bias.float()
        return dense, state, "dequantized"
    with storage_on_meta():
        layer = Int4WeightOnlyLinear(n_in, n_out, bias=bias is not None, group_size=group)
    step = scales.float().t().contiguous()  # [out, groups]
    mins = -zeros.float().t() * step  # exact in float32: a 5-bit integer times a float16 or float32 scale
    exact_fp16 = scales.dtype == torch.float16 and torch.equal(mins.half().float(), mins)
    state["packed"] = pack_int4(codes.t().contiguous()).contiguous()
    state["scales"] = step.half() if exact_fp16 else step
    state["mins"] = mins.half() if exact_fp16 else mins.contiguous()
    if bias is not None:
        state["bias"] = bias.float()
    if not exact_fp16:  # the layer's buffers take the dtypes stored (float32 keeps the exact values)
        layer.scales, layer.mins = state["scales"].to("meta"), state["mins"].to("meta")
    return layer, state, "kernels" if exact_fp16 else "reference"


def load_hf_quantized(directory: Path) -> tuple[nn.Module, Any, str, QuantReport]:
    """(model, tokenizer, model id, report) of a GPTQ/AWQ checkpoint, its packed linears on our int4 storage."""
    from transformers import AutoConfig, AutoTokenizer

    qc = check_quantization_config(directory)
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we place the layers ourselves; transformers' quantizer stays out
    model = empty_skeleton(config)
    tensors, origin = _read_tensors(directory)
    modules: dict[str, nn.Module] = {}
    state: dict[str, torch.Tensor] = {}
    paths: dict[str, list[str]] = {"kernels": [], "reference": [], "dequantized": []}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.qweight" not in tensors:
            continue
        layer, layer_state, path = _quantized_linear(name, module, qc, tensors, origin, directory)
        modules[name] = layer
        state.update({f"{name}.{k}": v for k, v in layer_state.items()})
        paths[path].append(name)
    leftover = [k for k in tensors if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")]
    if leftover:
        raise PrequantizedError(f"{origin[leftover[0]]}: tensor {leftover[0]} belongs to no linear of the model")
    for name, tensor in tensors.items():  # float tensors (embedding, norms, an unquantized head), as float32
        state[name] = tensor.float() if tensor.is_floating_point() else tensor
    if config.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    install_modules(model, modules)
    assign_tensors(model, state, directory)
    if paths["reference"]:
        log.warning(
            "%d layer(s) keep float32 zero points (not exact in float16) and run the reference path, e.g. %s",
            len(paths["reference"]),
            paths["reference"][0],
        )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    report = build_report(model, NATIVE, dequantized=[f"{n} (act-order)" for n in paths["dequantized"]])
    report.mode = f"{NATIVE} ({qc['quant_method']})"
    return model, tokenizer, f"{directory.name} ({qc['quant_method']})", report
