"""GPTQ and AWQ checkpoints of the tiny Llama, packed here from the formats' documentation.

Every linear but the head is quantized to 4 bits per group with min-max (asymmetric) or absmax
(symmetric, zero 8) parameters, then packed as AutoGPTQ / GPTQModel (`qweight` along the input,
`qzeros` along the output, `g_idx`) or AutoAWQ's GEMM layout (both along the output, in AWQ's
interleaved order). The other tensors are stored in float16, as such checkpoints are.
`reference_weights` is the formats' de-quantization, w = scale · (q − zero), written independently
of `quant.hf_gptq`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's WQLinear_GEMM.from_linear `order_map`
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_groups(weight: torch.Tensor, group: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [in, out], zeros [groups, out], scales float16 [groups, out]) of weight [out, in]."""
    w = weight.float().t()  # [in, out]
    n_in, n_out = w.shape
    grouped = w.reshape(n_in // group, group, n_out)
    if sym:
        scales = (grouped.abs().amax(1) / 7).clamp_min(1e-8).half()
        zeros = torch.full_like(scales, 8, dtype=torch.int32)
    else:
        lo, hi = grouped.amin(1), grouped.amax(1)
        scales = ((hi - lo) / 15).clamp_min(1e-8).half()
        zeros = torch.round(-lo / scales.float()).clamp(1, 15).to(torch.int32)  # >= 1: AutoGPTQ stores zero - 1
    codes = torch.round(grouped / scales.float()[:, None]) + zeros[:, None]
    return codes.clamp(0, 15).to(torch.int32).reshape(n_in, n_out), zeros, scales


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (held in int64) as the int32 the formats store (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_gptq_qweight(codes: torch.Tensor) -> torch.Tensor:
    """[in, out] -> [in / 8, out]: input 8i + j in bits 4j.. of row i."""
    words = torch.zeros(codes.shape[0] // 8, codes.shape[1], dtype=torch.int64)
    for j in range(8):
        words |= codes[j::8].long() << (4 * j)
    return _to_int32(words)


def pack_columns(values: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[rows, out] -> [rows, out / 8]: output 8c + order[j] in bits 4j.. of column c."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for j in range(8):
        words |= (values[:, order[j] :: 8].long() & 0xF) << (4 * j)
    return _to_int32(words)


def write_checkpoint(
    model_dir: Path,
    target: Path,
    method: str,
    *,
    group: int = 32,
    sym: bool = False,
    checkpoint_format: str = "gptq",
    act_order_in: tuple[str, ...] = (),
    config_edit=None,
) -> Path:
    """The tiny model at `model_dir` as a `method` ("gptq" or "awq") checkpoint in directory `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for file in model_dir.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, target / file.name)
    state = load_file(model_dir / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module = name.rpartition(".")[0]
        if module.rsplit(".", 1)[-1] not in LINEARS:
            out[name] = tensor.half()
            continue
        codes, zeros, scales = quantize_groups(tensor, group, sym)
        if method == "gptq":
            stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
            out[f"{module}.qweight"] = pack_gptq_qweight(codes)
            out[f"{module}.qzeros"] = pack_columns(stored_zeros)
            g_idx = torch.arange(codes.shape[0], dtype=torch.int32) // group
            if any(module.endswith(n) for n in act_order_in):
                g_idx = g_idx[torch.randperm(len(g_idx), generator=torch.Generator().manual_seed(0))]
                codes, zeros, scales = _regroup(tensor, g_idx, zeros.shape[0])
                out[f"{module}.qweight"] = pack_gptq_qweight(codes)
                out[f"{module}.qzeros"] = pack_columns(zeros - 1 if checkpoint_format == "gptq" else zeros)
            out[f"{module}.g_idx"] = g_idx
        else:
            out[f"{module}.qweight"] = pack_columns(codes, AWQ_ORDER)
            out[f"{module}.qzeros"] = pack_columns(zeros, AWQ_ORDER)
        out[f"{module}.scales"] = scales
    save_file(out, str(target / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym, "desc_act": bool(act_order_in)}
        qc["checkpoint_format"] = checkpoint_format
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    config["quantization_config"] = qc
    if config_edit is not None:
        config_edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _regroup(weight: torch.Tensor, g_idx: torch.Tensor, groups: int):
    """Codes, zeros and scales when input k belongs to group g_idx[k] (act-order), min-max per group."""
    w = weight.float().t()  # [in, out]
    scales = torch.empty(groups, w.shape[1], dtype=torch.float16)
    zeros = torch.empty(groups, w.shape[1], dtype=torch.int32)
    for g in range(groups):
        rows = w[g_idx == g]
        lo, hi = rows.amin(0), rows.amax(0)
        scales[g] = ((hi - lo) / 15).clamp_min(1e-8).half()
        zeros[g] = torch.round(-lo / scales[g].float()).clamp(1, 15).to(torch.int32)
    codes = torch.round(w / scales[g_idx].float()) + zeros[g_idx]
    return codes.clamp(0, 15).to(torch.int32), zeros, scales


def reference_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The float model the checkpoint stands for: w = scale · (q − zero), the formats' definition."""
    config = json.loads((checkpoint / "config.json").read_text())
    qc = config["quantization_config"]
    stored = load_file(checkpoint / "model.safetensors")
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        module, _, kind = name.rpartition(".")
        if kind not in ("qweight", "qzeros", "scales", "g_idx"):
            weights[name] = tensor.float()
        if kind != "qweight":
            continue
        scales = stored[f"{module}.scales"].float()
        n_out = scales.shape[1]
        if qc["quant_method"] == "gptq":
            n_in = tensor.shape[0] * 8
            codes = torch.stack([(tensor[k // 8] >> (4 * (k % 8))) & 0xF for k in range(n_in)])  # [in, out]
            raw = stored[f"{module}.qzeros"]
            zeros = torch.stack([(raw[:, n // 8] >> (4 * (n % 8))) & 0xF for n in range(n_out)], dim=1)
            zeros = zeros + (1 if qc.get("checkpoint_format", "gptq") == "gptq" else 0)
            g_idx = stored[f"{module}.g_idx"].long()
        else:
            n_in = tensor.shape[0]
            position = {logical: j for j, logical in enumerate(AWQ_ORDER)}
            codes = torch.stack([(tensor[:, n // 8] >> (4 * position[n % 8])) & 0xF for n in range(n_out)], dim=1)
            raw = stored[f"{module}.qzeros"]
            zeros = torch.stack([(raw[:, n // 8] >> (4 * position[n % 8])) & 0xF for n in range(n_out)], dim=1)
            g_idx = torch.arange(n_in) // qc["group_size"]
        weights[f"{module}.weight"] = (scales[g_idx] * (codes.float() - zeros[g_idx].float())).t().contiguous()
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights
