"""`QS_PRECISION=native` on a GGUF: its tensors served in their own types, never through float.

llama.cpp's block formats map onto our storage without changing a number (blocks of 32 along
the input dimension, fp16 parameters; ggml's documentation, `ggml-common.h`):

| GGUF | block (bytes) | weight | ours |
|---|---|---|---|
| Q4_1 | d fp16, m fp16, 16 bytes of codes (20) | d·q + m, q in 0..15 | int4 g32: scales = d, mins = m |
| Q4_0 | d fp16, 16 bytes of codes (18) | d·(q − 8) | int4 g32: scales = d, mins = −8·d (exact in fp16) |
| Q8_0 | d fp16, 32 int8 codes (34) | d·q | int8 g32 (`Int8G32Linear`): weight_int8 = q, scales = d |

A Q4 block holds weight j in the low nibble of byte j and weight j + 16 in its high nibble; our int4
packs weights 2i and 2i + 1 in byte i, so the codes are re-packed (same codes, same d and m).
Q and K rows come permuted for llama.cpp's RoPE; they are put back in the Hugging Face order as
transformers does (rows are whole blocks, so this moves bytes only). F32/F16/BF16 tensors load as
float; any other quantized type (Q6_K, ...) has no kernel here: it is de-quantized by the `gguf`
package, logged and counted (`/info` `layers_fallback`). Tensor data is read with plain file reads,
after the header is parsed (`read_index`), so the file's pages never count in the process's RSS.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quant.api import QuantReport
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.layers.int8_grouped import BLOCK, Int8G32Embedding, Int8G32Linear
from quant.prequantized import (
    NATIVE,
    PrequantizedError,
    assign_tensors,
    build_report,
    empty_skeleton,
    install_modules,
    storage_on_meta,
)

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_FLOAT_TYPES = ("F32", "F16", "BF16")


def hf_name(gguf_name: str) -> tuple[str, str] | None:
    """(module, parameter) of the Hugging Face Llama for a GGUF tensor name; None when unknown."""
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        return (f"model.layers.{layer}.{_LAYER_TENSORS[part]}", kind) if part in _LAYER_TENSORS else None
    base, _, kind = gguf_name.rpartition(".")
    return (_GLOBAL_TENSORS[base], kind) if base in _GLOBAL_TENSORS and kind in ("weight", "bias") else None


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    """Raw bytes [rows, row_bytes] viewed as [rows, n_blocks, block_bytes]."""
    return raw.reshape(rows, -1, block_bytes)


def _fp16(blocks: np.ndarray, start: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0].copy())


def _q4_packed(blocks: np.ndarray, start: int) -> torch.Tensor:
    """Our int4 bytes [rows, K / 2] from Q4 blocks' 16 code bytes, which hold weight j in the low nibble of
    byte j and weight j + 16 in its high nibble; ours hold weights 2i (low) and 2i + 1 (high) in byte i.
    So our bytes 0..7 take the low nibbles of code bytes (2i, 2i + 1), bytes 8..15 their high nibbles."""
    qs = blocks[..., start : start + 16]
    even, odd = qs[..., 0::2], qs[..., 1::2]  # numpy: vectorised, and no thread team to wake per call
    packed = np.concatenate(((even & 0x0F) | ((odd & 0x0F) << 4), (even >> 4) | (odd & 0xF0)), axis=-1)
    return torch.from_numpy(packed.reshape(packed.shape[0], -1))


def int4_from_q4_1(raw: np.ndarray, out_features: int, in_features: int) -> Int4WeightOnlyLinear:
    """A Q4_1 tensor as int4 g32 storage: scales = d, mins = m, the codes re-packed."""
    blocks = _blocks(raw, out_features, 20)
    with storage_on_meta():
        layer = Int4WeightOnlyLinear(in_features, out_features, bias=False, group_size=BLOCK)
    layer.scales, layer.mins = _fp16(blocks, 0), _fp16(blocks, 2)
    layer.packed = _q4_packed(blocks, 4)
    layer.select_kernel()  # for the storage it now holds
    return layer


def int4_from_q4_0(raw: np.ndarray, out_features: int, in_features: int) -> Int4WeightOnlyLinear:
    """A Q4_0 tensor as int4 g32 storage: d·(q − 8) = d·q + (−8·d); −8·d is exact in fp16 (a power-of-two scaling)."""
    blocks = _blocks(raw, out_features, 18)
    with storage_on_meta():
        layer = Int4WeightOnlyLinear(in_features, out_features, bias=False, group_size=BLOCK)
    scales = _fp16(blocks, 0)
    mins = scales * -8
    if not torch.isfinite(mins).all():
        raise ValueError("a Q4_0 scale times 8 overflows float16")
    layer.scales, layer.mins = scales, mins
    layer.packed = _q4_packed(blocks, 2)
    layer.select_kernel()
    return layer


def int8_g32_from_q8_0(raw: np.ndarray, out_features: int, in_features: int) -> Int8G32Linear:
    """A Q8_0 tensor as int8 g32 storage: weight_int8 = q, scales = d."""
    blocks = _blocks(raw, out_features, 34)
    with storage_on_meta():
        layer = Int8G32Linear(in_features, out_features, bias=False)
    layer.scales = _fp16(blocks, 0)
    codes = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8)
    layer.weight_int8 = torch.from_numpy(codes.reshape(out_features, in_features).copy())
    layer.select_kernel()
    return layer


_CONVERTERS = {"Q4_1": int4_from_q4_1, "Q4_0": int4_from_q4_0, "Q8_0": int8_g32_from_q8_0}


def _unpermute_rows(raw: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (transformers' `_reverse_permute_weights`), on whole rows."""
    dim = raw.shape[0] // n_head // 2
    return raw.reshape(n_head, dim, 2, *raw.shape[1:]).swapaxes(2, 1).reshape(raw.shape)


def _read_bytes(path: Path, offset: int, n_bytes: int) -> np.ndarray:
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(n_bytes)
    if len(data) != n_bytes:
        raise EOFError(f"{n_bytes} bytes expected at offset {offset}, {len(data)} found")
    return np.frombuffer(data, dtype=np.uint8)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file, as its header describes it."""

    name: str
    dims: tuple[int, ...]  # GGUF order: the fastest-varying (input) dimension first
    type_id: int
    data_offset: int  # from the start of the file
    n_bytes: int | None  # None when the type is unknown


@dataclass(frozen=True)
class GGUFIndex:
    metadata: dict[str, Any]  # the scalar and string fields; arrays (the tokenizer's) are skipped
    tensors: list[TensorInfo]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAGIC = b"GGUF"


class _Header:
    """Little-endian reads from the file's bytes (a memory map: only the header's pages are touched)."""

    def __init__(self, data: Any) -> None:
        self.data, self.at = data, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        if self.at + length > len(self.data):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.data[self.at : self.at + length]).decode("utf-8", errors="replace")
        self.at += length
        return text

    def value(self, type_id: int) -> Any:
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALARS:  # skipped in one step
                self.at += count * struct.calcsize(_SCALARS[item_type])
            elif item_type == _STRING:  # skipped without decoding (the vocabulary)
                for _ in range(count):
                    length = self.scalar("<Q")  # read before advancing: `at += scalar()` would lose its 8 bytes
                    self.at += length
            else:
                for _ in range(count):
                    self.value(item_type)
            return None
        if type_id not in _SCALARS:
            raise ValueError(f"unknown metadata value type {type_id}")
        return self.scalar(_SCALARS[type_id])


def read_index(path: Path) -> GGUFIndex:
    """The GGUF's metadata and tensor table (the format of ggml's `docs/gguf.md`), without reading tensor data.

    The `gguf` package's reader parses every tokenizer string into its own arrays (about 30 s and 300 MiB
    for the default model's 49,152-entry vocabulary); serving needs only the scalars and the tensor table.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            header = _Header(data)
            if bytes(data[:4]) != _MAGIC:
                raise ValueError("no GGUF magic number")
            header.at = 4
            version, n_tensors, n_fields = header.scalar("<I"), header.scalar("<Q"), header.scalar("<Q")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (read: 2, 3)")
            metadata = {}
            for _ in range(n_fields):
                key = header.string()
                metadata[key] = header.value(header.scalar("<I"))
            infos = []
            for _ in range(n_tensors):
                name = header.string()
                dims = tuple(header.scalar("<Q") for _ in range(header.scalar("<I")))
                infos.append((name, dims, header.scalar("<I"), header.scalar("<Q")))
            alignment = int(metadata.get("general.alignment") or 32)
            data_start = -(-header.at // alignment) * alignment
    except (OSError, ValueError, struct.error) as error:
        raise PrequantizedError(f"{path}: not a readable GGUF file, truncated or corrupt ({error})") from None
    tensors = []
    for name, dims, type_id, offset in infos:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            n_bytes = math.prod(dims) // block * block_bytes
        except (ValueError, KeyError):
            n_bytes = None
        tensors.append(TensorInfo(name, dims, type_id, data_start + offset, n_bytes))
    return GGUFIndex(metadata, tensors)


def metadata_cache_dir(path: Path, cache_dir: Path) -> Path:
    """Where the GGUF's config.json and tokenizer are cached (keyed by the file's path, size and time)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "native" / f"{path.stem}-{key}"


def _metadata_dir(path: Path, cache_dir: Path) -> Path:
    """config.json and the tokenizer, made from the GGUF's metadata by transformers once and cached."""
    target = metadata_cache_dir(path, cache_dir)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    log.info("reading %s's config and tokenizer (first start only)", path.name)
    target.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(target)
    with contextlib.suppress(OSError, ValueError):  # a file without generation settings has none to cache
        GenerationConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(target)
    AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(target)  # last: marks it complete
    return target


def load_gguf_native(path: Path, cache_dir: Path) -> tuple[nn.Module, Any, str, QuantReport]:
    """(model, tokenizer, model id, report) with the GGUF's tensors in our storage formats."""
    from gguf import GGMLQuantizationType
    from transformers import AutoConfig, AutoTokenizer

    index = read_index(path)
    architecture = index.metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise PrequantizedError(
            f"{path}: architecture {architecture!r} is not served natively ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    metadata = _metadata_dir(path, cache_dir)
    config = AutoConfig.from_pretrained(metadata)
    names = [t.name for t in index.tensors]
    has_output = "output.weight" in names
    config.tie_word_embeddings = False  # the head is its own module below (or the embedding reads the head's table)
    model = empty_skeleton(config)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    modules: dict[str, nn.Module] = {}
    tensors: dict[str, torch.Tensor] = {}
    dequantized: list[str] = []
    file_size = path.stat().st_size
    for info in index.tensors:
        mapped = hf_name(info.name)
        if mapped is None:
            raise PrequantizedError(f"{path}: tensor {info.name} has no place in a {architecture} model")
        module_name, kind = mapped
        if info.n_bytes is None:
            raise PrequantizedError(f"{path}: tensor {info.name} has unknown type {info.type_id}")
        type_name = GGMLQuantizationType(info.type_id).name
        shape = list(reversed(info.dims))  # GGUF lists the fastest dimension first
        try:
            target = model.get_submodule(module_name)
        except AttributeError:
            raise PrequantizedError(
                f"{path}: tensor {info.name} ({module_name}) is not in the model the config describes"
            ) from None
        expected = list(getattr(target, kind).shape)
        if shape != expected:
            raise PrequantizedError(f"{path}: tensor {info.name} has shape {shape}, the config implies {expected}")
        if info.data_offset + info.n_bytes > file_size:
            raise PrequantizedError(
                f"{path}: tensor {info.name} runs past the end of the file ({file_size} bytes): truncated"
            )
        try:
            raw = _read_bytes(path, info.data_offset, info.n_bytes)
        except (OSError, EOFError) as error:
            raise PrequantizedError(f"{path}: tensor {info.name} cannot be read (truncated file? {error})") from None
        rows = shape[0]
        raw = raw.reshape(rows, -1) if len(shape) == 2 else raw
        part = info.name.split(".")[-2] if info.name.startswith("blk.") else ""
        if part in heads:
            raw = _unpermute_rows(raw, heads[part])
        is_matrix = kind == "weight" and len(shape) == 2
        if is_matrix and type_name in _CONVERTERS and shape[1] % BLOCK == 0:
            layer = _CONVERTERS[type_name](raw, *shape)
            if module_name == "model.embed_tokens":
                if not isinstance(layer, Int8G32Linear):
                    layer = None  # a 4-bit table has no embedding lookup here: de-quantized below
                else:
                    modules["model.embed_tokens"] = layer  # a lookup table; tied to the head below
                    if not has_output:
                        modules["lm_head"] = layer
                    continue
            if layer is not None:
                modules[module_name] = layer
                continue
        if type_name in _FLOAT_TYPES:
            tensors[f"{module_name}.{kind}"] = _float_tensor(raw, type_name, shape)
            continue
        tensors[f"{module_name}.{kind}"] = _dequantized(path, info.name, raw, type_name, shape)
        dequantized.append(f"{info.name} ({type_name})")
    if not has_output and "model.embed_tokens.weight" in tensors:  # a tied float head reads the float table
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    embedding_table = modules.pop("model.embed_tokens", None)
    install_modules(model, modules)
    if isinstance(embedding_table, Int8G32Linear):
        install_modules(model, {"model.embed_tokens": Int8G32Embedding(embedding_table)})
    stored = {}
    for name, module in modules.items():
        stored.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
    if isinstance(embedding_table, Int8G32Linear):
        stored["model.embed_tokens.weight_int8"] = embedding_table.weight_int8
        stored["model.embed_tokens.scales"] = embedding_table.scales
    assign_tensors(model, {**stored, **tensors}, path)
    tokenizer = AutoTokenizer.from_pretrained(metadata)
    report = build_report(model, NATIVE, dequantized=dequantized)
    return model, tokenizer, f"{path.name} (native)", report


def _float_tensor(raw: np.ndarray, type_name: str, shape: list[int]) -> torch.Tensor:
    dtype = {"F32": np.float32, "F16": np.float16, "BF16": None}[type_name]
    if dtype is None:  # numpy has no bfloat16: widen the 16 bits
        bits = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).copy())
        return bits.view(torch.bfloat16).float().reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(raw).view(dtype).astype(np.float32)).reshape(shape)


def _dequantized(path: Path, name: str, raw: np.ndarray, type_name: str, shape: list[int]) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        values = dequantize(np.ascontiguousarray(raw), GGMLQuantizationType[type_name])
    except (NotImplementedError, ValueError, KeyError) as error:
        raise PrequantizedError(f"{path}: tensor {name} of type {type_name} cannot be read ({error})") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
