"""Tiny GGUF files written from the tiny Llama with the `gguf` package, for the native-loading tests.

`write_tiny_gguf` quantizes each tensor to the type asked (llama.cpp's Q/K row permutation applied, as
llama.cpp's converter does) and puts the tiny model's config and tokenizer where `quant.gguf_native`
caches a GGUF's metadata, so no tokenizer has to be made from GGUF fields. `reference_weights` gives the
float values each tensor decodes to (the `gguf` package's own de-quantization), in Hugging Face order.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file

from quant.gguf_native import metadata_cache_dir

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
HEADS, KV_HEADS = 4, 2  # the tiny Llama's (tests/conftest.py)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's Q/K permutation (`convert_hf_to_gguf.py`, `LlamaModel.permute`)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _heads(name: str) -> int | None:
    return HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else None


def default_types(name: str) -> GGMLQuantizationType:
    """Q8_0 table, Q4_1 layers (the shipped model's), one Q4_0 and one Q5_0 (no kernel here) layer, F32 norms."""
    if "norm" in name:
        return GGMLQuantizationType.F32
    if name == "token_embd.weight":
        return GGMLQuantizationType.Q8_0
    if name == "blk.1.ffn_up.weight":
        return GGMLQuantizationType.Q4_0
    if name == "blk.1.attn_v.weight":
        return GGMLQuantizationType.Q5_0
    return GGMLQuantizationType.Q4_1


def write_tiny_gguf(model_dir: Path, target: Path, cache_dir: Path, types=default_types, edit=None) -> Path:
    """The tiny model as a GGUF at `target`; `edit(tensors)` may change the {gguf name: float array} first."""
    state = load_file(model_dir / "model.safetensors")
    tensors = {gguf_name(k): v.float().numpy() for k, v in state.items()}
    if edit is not None:
        edit(tensors)
    writer = GGUFWriter(target, "llama")
    writer.add_block_count(2)
    for name, values in tensors.items():
        n_head = _heads(name)
        arranged = permute(values, n_head) if n_head else values
        qtype = types(name)
        data = arranged.astype(np.float32) if qtype == GGMLQuantizationType.F32 else quantize(arranged, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata = metadata_cache_dir(target, cache_dir)
    metadata.mkdir(parents=True, exist_ok=True)
    for file in model_dir.iterdir():
        if file.suffix in (".json", ".jinja") or file.name.startswith("tokenizer"):
            shutil.copy(file, metadata / file.name)
    return target


def reference_weights(model_dir: Path, types=default_types) -> dict[str, torch.Tensor]:
    """Each tensor of the tiny model as its GGUF type decodes it (the `gguf` package's de-quantization)."""
    state = load_file(model_dir / "model.safetensors")
    decoded = {}
    for hf, value in state.items():
        qtype = types(gguf_name(hf))
        values = value.float().numpy()
        if qtype != GGMLQuantizationType.F32:
            values = dequantize(quantize(values, qtype), qtype).reshape(values.shape)
        decoded[hf] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return decoded
