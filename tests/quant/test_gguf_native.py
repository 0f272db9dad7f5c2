"""`QS_PRECISION=native` on a GGUF: block formats mapped without changing a number, the tiny model end to end,
the shipped model's weights bit for bit, and every bad file."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file

import quant.kernels as qk
from quant.checkpoints import convert_gguf, embedded_gguf, load_float_model
from quant.gguf_native import (
    _unpermute_rows,
    hf_name,
    int4_from_q4_0,
    int4_from_q4_1,
    int8_g32_from_q8_0,
    load_gguf_native,
    metadata_cache_dir,
)
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.layers.int8_grouped import Int8G32Embedding, Int8G32Linear
from quant.prequantized import PrequantizedError
from quant.saved import load_saved
from tests.support.gguf_files import permute, reference_weights, write_tiny_gguf

TINY_PROMPT = torch.tensor([[1, 5, 9, 20, 33, 7, 100, 2]])
CONVERTERS = {T.Q4_0: int4_from_q4_0, T.Q4_1: int4_from_q4_1, T.Q8_0: int8_g32_from_q8_0}


def test_hand_computed_q4_1_block() -> None:
    """One Q4_1 block, written byte by byte: d = 0.5, m = -1, weight j has code j % 16."""
    d, m = np.float16(0.5).tobytes(), np.float16(-1.0).tobytes()
    codes = [j % 16 for j in range(32)]
    qs = bytes(codes[j] | (codes[j + 16] << 4) for j in range(16))  # weight j low nibble, j + 16 high
    layer = int4_from_q4_1(np.frombuffer(d + m + qs, dtype=np.uint8).reshape(1, 20), 1, 32)
    # ours: byte i holds weights 2i (low) and 2i + 1 (high): (0, 1) -> 0x10, (2, 3) -> 0x32, ...
    assert layer.packed[0, :3].tolist() == [0x10, 0x32, 0x54]
    assert layer.scales.tolist() == [[0.5]] and layer.mins.tolist() == [[-1.0]]
    assert layer.dequantize_weight()[0].tolist() == [0.5 * c - 1.0 for c in codes]


@pytest.mark.parametrize("qtype", list(CONVERTERS), ids=lambda t: t.name)
def test_block_formats_decode_to_the_gguf_package_values(qtype: T) -> None:
    torch.manual_seed(0)
    weight = (torch.randn(48, 96) * 0.05).numpy()
    raw = quantize(weight, qtype)
    layer = CONVERTERS[qtype](raw, 48, 96)
    expected = torch.from_numpy(dequantize(raw, qtype).reshape(48, 96))
    assert torch.equal(layer.dequantize_weight(), expected)  # bit for bit
    assert isinstance(layer, Int8G32Linear if qtype == T.Q8_0 else Int4WeightOnlyLinear)
    if qtype != T.Q8_0:
        assert layer.group_size == 32 and layer.scales.dtype == torch.float16 and layer.mins.dtype == torch.float16


def test_rows_are_put_back_in_hugging_face_order() -> None:
    rows = np.arange(16 * 3).reshape(16, 3)
    for n_head in (2, 4):
        assert np.array_equal(_unpermute_rows(permute(rows, n_head), n_head), rows)


def test_tensor_names_map_to_the_llama_modules() -> None:
    assert hf_name("blk.7.ffn_down.weight") == ("model.layers.7.mlp.down_proj", "weight")
    assert hf_name("token_embd.weight") == ("model.embed_tokens", "weight")
    assert hf_name("output.weight") == ("lm_head", "weight")
    assert hf_name("blk.0.attn_sinks.weight") is None


@pytest.fixture
def tiny_gguf(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf", tmp_path / "cache")


def test_tiny_gguf_serves_its_own_numbers(tiny_model_dir: Path, tiny_gguf: Path, tmp_path: Path, caplog) -> None:
    """Each layer holds the GGUF's values; with the reference kernels the logits are the float model's on those values."""
    with caplog.at_level(logging.WARNING):
        model, _, model_id, report = load_gguf_native(tiny_gguf, tmp_path / "cache")
    reference = reference_weights(tiny_model_dir)
    layers = dict(model.named_modules())
    for name, weight in reference.items():
        module_name, _, kind = name.rpartition(".")
        module = layers[module_name]
        if isinstance(module, (Int4WeightOnlyLinear, Int8G32Linear)):
            assert torch.equal(module.dequantize_weight(), weight), name
        elif not isinstance(module, Int8G32Embedding):
            assert torch.equal(getattr(module, kind), weight), name
    assert isinstance(model.model.embed_tokens, Int8G32Embedding)
    assert model.lm_head.weight_int8.data_ptr() == model.model.embed_tokens.weight_int8.data_ptr()
    assert isinstance(model.model.layers[1].mlp.up_proj, Int4WeightOnlyLinear)  # Q4_0
    # Q5_0 has no kernel: de-quantized, logged, counted
    assert report.layers_fallback == 1 and report.fallback_examples == ["blk.1.attn_v.weight (Q5_0)"]
    assert "blk.1.attn_v.weight" in caplog.text
    assert report.layers_quantized == 14 and report.lm_head.startswith("int8-g32")
    assert "native" in model_id

    float_model, _, _ = load_float_model(str(tiny_model_dir))
    float_model.load_state_dict({**reference, "lm_head.weight": reference["model.embed_tokens.weight"]})
    qk.configure(kernels="reference")
    try:
        model, *_ = load_gguf_native(tiny_gguf, tmp_path / "cache")
        with torch.inference_mode():
            served, expected = model(TINY_PROMPT).logits, float_model(TINY_PROMPT).logits
    finally:
        qk.configure()
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)  # fp32 round-off only


# --- bad files: one line naming the file and the tensor -----------------------------------------


def _fails(path: Path, cache: Path, *fragments: str) -> None:
    with pytest.raises(PrequantizedError) as caught:
        load_gguf_native(path, cache)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message


def _rewrite(path: Path, data: bytes, cache: Path, source: Path) -> None:
    """Replace the file's bytes and carry the tiny metadata over to the new cache key (size and time changed)."""
    old = metadata_cache_dir(source, cache)
    files = {f.name: f.read_bytes() for f in old.iterdir()}
    path.write_bytes(data)
    new = metadata_cache_dir(path, cache)
    new.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (new / name).write_bytes(content)


def test_truncated_gguf_names_the_tensor_cut(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = tiny_gguf.read_bytes()
    last = GGUFReader(tiny_gguf).tensors[-1]
    _rewrite(tiny_gguf, data[: int(last.data_offset) + 10], cache, tiny_gguf)
    _fails(tiny_gguf, cache, last.name, "runs past the end of the file", "truncated")


def test_tensor_data_cut_short_is_named(tiny_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    # a file that shrinks after it was opened (or a reader that maps lazily) fails at the tensor's read
    import quant.gguf_native as native

    real_read = native._read_bytes
    last = GGUFReader(tiny_gguf).tensors[-1]

    def short_read(path: Path, offset: int, n_bytes: int):
        if offset == int(last.data_offset):
            raise EOFError(f"{n_bytes} bytes expected at offset {offset}, 10 found")
        return real_read(path, offset, n_bytes)

    monkeypatch.setattr(native, "_read_bytes", short_read)
    _fails(tiny_gguf, tmp_path / "cache", last.name, "truncated")


def test_gguf_cut_inside_its_header_is_not_readable(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _rewrite(tiny_gguf, tiny_gguf.read_bytes()[:200], cache, tiny_gguf)
    _fails(tiny_gguf, cache, "not a readable GGUF file, truncated or corrupt")


def test_unknown_tensor_type_is_named(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    info = next(t for t in GGUFReader(tiny_gguf).tensors if t.name == "blk.0.ffn_up.weight")
    # the type is the second-to-last part of the tensor's info record: name, n_dims, dims, type, offset
    type_at = info.field.offset + sum(p.nbytes for p in info.field.parts[:-2])
    data = bytearray(tiny_gguf.read_bytes())
    assert struct.unpack_from("<I", data, type_at)[0] == T.Q4_1
    struct.pack_into("<I", data, type_at, 250)
    _rewrite(tiny_gguf, bytes(data), cache, tiny_gguf)
    _fails(tiny_gguf, cache, "blk.0.ffn_up.weight", "unknown type 250")


def test_shape_that_does_not_match_the_config_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    def wider(tensors: dict) -> None:
        tensors["blk.1.ffn_gate.weight"] = np.zeros((96, 64), dtype=np.float32)

    path = write_tiny_gguf(tiny_model_dir, tmp_path / "bad.gguf", tmp_path / "cache", edit=wider)
    _fails(path, tmp_path / "cache", "blk.1.ffn_gate.weight", "[96, 64]", "[128, 64]")


def test_tensor_with_no_place_in_the_model_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    def extra(tensors: dict) -> None:
        tensors["blk.0.attn_sinks.weight"] = np.zeros(64, dtype=np.float32)

    path = write_tiny_gguf(tiny_model_dir, tmp_path / "bad.gguf", tmp_path / "cache", edit=extra)
    _fails(path, tmp_path / "cache", "blk.0.attn_sinks.weight")


def test_missing_tensor_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = write_tiny_gguf(
        tiny_model_dir, tmp_path / "bad.gguf", tmp_path / "cache", edit=lambda t: t.pop("blk.1.ffn_norm.weight")
    )
    _fails(path, tmp_path / "cache", "model.layers.1.post_attention_layernorm.weight", "missing")


def test_the_index_reads_what_the_gguf_package_reads(tiny_gguf: Path) -> None:
    from quant.gguf_native import read_index

    index, reader = read_index(tiny_gguf), GGUFReader(tiny_gguf)
    assert index.metadata["general.architecture"] == "llama" and index.metadata["llama.block_count"] == 2
    assert [(t.name, t.dims, t.type_id, t.data_offset, t.n_bytes) for t in index.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors
    ]


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "other.gguf"
    writer = GGUFWriter(path, "mamba")
    writer.add_tensor("x.weight", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _fails(path, tmp_path, "'mamba'")


def test_native_saves_and_loads_as_our_format(tiny_gguf: Path, tmp_path: Path) -> None:
    from tools.save import main as save_main

    out = tmp_path / "saved-native"
    args = ["--model", str(tiny_gguf), "--precision", "native", "--cache-dir", str(tmp_path / "cache")]
    assert save_main([*args, "--out", str(out)]) == 0
    native, *_ = load_gguf_native(tiny_gguf, tmp_path / "cache")
    saved, _, _, report = load_saved(out)
    with torch.inference_mode():
        assert torch.equal(saved(TINY_PROMPT).logits, native(TINY_PROMPT).logits)
    assert report.mode == "native" and report.layers_quantized == 14


@pytest.mark.real_model
def test_the_shipped_gguf_is_served_with_its_own_numbers(cache_dir: Path) -> None:
    """Every weight of the native model equals the float checkpoint transformers de-quantized from the same GGUF."""
    model, _, _, report = load_gguf_native(embedded_gguf(), cache_dir)
    converted = load_file(convert_gguf(embedded_gguf(), cache_dir) / "model.safetensors")
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, (Int4WeightOnlyLinear, Int8G32Linear)):
            source = "model.embed_tokens.weight" if name == "lm_head" else f"{name}.weight"
            assert torch.equal(module.dequantize_weight(), converted[source]), name
            checked += 1
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, converted[name]), name
        checked += 1
    assert checked == 30 * 7 + 1 + 30 * 2 + 1  # linears, head (= embedding table), norms, final norm
    assert report.layers_fallback == 0 and report.kernels.get(qk.REFERENCE, 0) == 0
    fp32_bytes = sum(t.numel() * 4 for t in converted.values())
    assert report.total_weight_bytes / fp32_bytes < 0.2  # about a fifth of fp32's weight bytes


@pytest.mark.slow
@pytest.mark.real_model
def test_native_on_the_reference_kernels_has_fp32_perplexity(cache_dir: Path) -> None:
    from tools import quality

    qk.configure(kernels="reference")
    try:
        fp32, native = quality.evaluate(["native"], max_tokens=1024, cache_dir=cache_dir, progress=None)
    finally:
        qk.configure()
    assert native.perplexity == pytest.approx(fp32.perplexity, rel=1e-5)  # the same numbers in the weights
    assert native.agreement > 0.999
