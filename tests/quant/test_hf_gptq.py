"""GPTQ and AWQ checkpoints in the Hugging Face layout: the packing checked by hand, the tiny model's served
logits against the formats' own de-quantization, act-order, and every checkpoint we cannot serve."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quant.kernels as qk
from quant.checkpoints import load_float_model
from quant.hf_gptq import AWQ_ORDER, load_hf_quantized, unpack_columns, unpack_rows
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.prequantized import PrequantizedError, find_source
from tests.support.gptq_files import pack_columns, pack_gptq_qweight, reference_weights, write_checkpoint

PROMPT = torch.tensor([[1, 5, 9, 20, 33, 7, 100, 2]])
# q[k, n] = (k + n) % 16 for an 8x8 weight: written out by hand below
HAND_CODES = torch.tensor([[(k + n) % 16 for n in range(8)] for k in range(8)], dtype=torch.int32)


def test_gptq_qweight_by_hand() -> None:
    # row 0 packs inputs 0..7 of each output, input j in bits 4j..: output 0 holds 0,1,...,7 -> 0x76543210
    expected = [0x76543210, 0x87654321, 0x98765432, 0xA9876543, 0xBA987654, 0xCBA98765, 0xDCBA9876, 0xEDCBA987]
    expected = [v - 2**32 if v >= 2**31 else v for v in expected]  # stored as int32
    packed = pack_gptq_qweight(HAND_CODES)
    assert packed.tolist() == [expected]
    assert torch.equal(unpack_rows(packed), HAND_CODES.to(torch.uint8))


def test_awq_qweight_by_hand() -> None:
    # row 0 holds outputs 0..7 with values 0..7 in AWQ's order 0,2,4,6,1,3,5,7 from the low nibble: 0x75316420
    packed = pack_columns(HAND_CODES, AWQ_ORDER)
    assert packed[0].tolist() == [0x75316420]
    assert packed[1].tolist() == [0x86427531 - 2**32]  # outputs hold 1..8: 1,3,5,7,2,4,6,8 from the low nibble
    assert torch.equal(unpack_columns(packed, AWQ_ORDER), HAND_CODES.to(torch.uint8))


def test_sequential_columns_by_hand() -> None:
    # GPTQ's qzeros: output 8c + j in bits 4j.. of column c
    assert pack_columns(HAND_CODES)[0].tolist() == [0x76543210]
    assert torch.equal(unpack_columns(pack_columns(HAND_CODES)), HAND_CODES.to(torch.uint8))


CASES = {
    "gptq-sym": {"method": "gptq", "sym": True},
    "gptq-asym": {"method": "gptq", "sym": False},
    "gptq_v2-asym": {"method": "gptq", "sym": False, "checkpoint_format": "gptq_v2"},
    "awq": {"method": "awq"},
    "gptq-sym-g64": {"method": "gptq", "sym": True, "group": 64},
}


def _served_and_reference(tiny_model_dir: Path, checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the served checkpoint on the reference kernels, and of the float model on its de-quantized weights."""
    float_model, _, _ = load_float_model(str(tiny_model_dir))
    float_model.load_state_dict(reference_weights(checkpoint))
    qk.configure(kernels="reference")
    try:
        model, *_ = load_hf_quantized(checkpoint)
        with torch.inference_mode():
            return model(PROMPT).logits, float_model(PROMPT).logits
    finally:
        qk.configure()


@pytest.mark.parametrize("case", list(CASES))
def test_served_checkpoint_matches_the_reference_dequantization(tiny_model_dir: Path, tmp_path: Path, case: str):
    options = dict(CASES[case])
    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / case, options.pop("method"), **options)
    source = find_source(str(checkpoint), None)
    assert source is not None and source.stored_precision == "native"
    model, _, model_id, report = load_hf_quantized(checkpoint)
    reference = reference_weights(checkpoint)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Int4WeightOnlyLinear)]
    assert len(layers) == 14
    for name, layer in layers:
        assert torch.equal(layer.dequantize_weight(), reference[f"{name}.weight"]), name  # bit for bit
    if case.startswith("gptq-sym"):  # zero 8: -8 * scale is exact in float16, so our kernels run
        assert all(layer.mins.dtype == torch.float16 for _, layer in layers)
        assert all(k != qk.REFERENCE for k in report.kernels)
    assert report.layers_quantized == 14 and report.layers_fallback == 0
    assert CASES[case]["method"] in model_id
    served, expected = _served_and_reference(tiny_model_dir, checkpoint)
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)  # fp32 round-off


def test_asymmetric_zero_points_that_float16_cannot_hold_run_the_reference_path(tiny_model_dir, tmp_path, caplog):
    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / "awq", "awq")
    with caplog.at_level(logging.WARNING):
        model, *_ = load_hf_quantized(checkpoint)
    inexact = [m for m in model.modules() if isinstance(m, Int4WeightOnlyLinear) and m.mins.dtype == torch.float32]
    assert inexact, "min-max zero points on random weights should include some not exact in float16"
    assert all(m.kernel == qk.REFERENCE for m in inexact)
    assert "reference path" in caplog.text


def test_act_order_weights_are_dequantized_and_counted(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / "desc", "gptq", act_order_in=("mlp.up_proj",))
    with caplog.at_level(logging.WARNING):
        model, _, _, report = load_hf_quantized(checkpoint)
    reference = reference_weights(checkpoint)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is torch.nn.Linear and torch.equal(up.weight, reference["model.layers.0.mlp.up_proj.weight"])
    assert report.layers_fallback == 2 and "act-order" in report.fallback_examples[0]
    assert "de-quantized" in caplog.text
    served, expected = _served_and_reference(tiny_model_dir, checkpoint)
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)


# --- checkpoints we cannot serve: one line naming the file and the tensor ---------------------


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda qc: qc.update(bits=8), "bits 8"),
        (lambda qc: qc.update(quant_method="bitsandbytes"), "quant_method 'bitsandbytes'"),
        (lambda qc: qc.update(quant_method="awq", version="gemv"), "AWQ version 'gemv'"),
        (lambda qc: qc.update(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
        (lambda qc: qc.update(group_size=0), "group_size 0"),
    ],
)
def test_a_quantization_config_we_cannot_serve_fails_at_once(tiny_model_dir, tmp_path, edit, fragment) -> None:
    checkpoint = write_checkpoint(
        tiny_model_dir, tmp_path / "bad", "gptq", config_edit=lambda c: edit(c["quantization_config"])
    )
    with pytest.raises(PrequantizedError) as caught:
        find_source(str(checkpoint), None)  # at settings time, before anything loads
    message = str(caught.value)
    assert str(checkpoint / "config.json") in message and fragment in message and "\n" not in message


def _fails(checkpoint: Path, *fragments: str) -> None:
    with pytest.raises(PrequantizedError) as caught:
        load_hf_quantized(checkpoint)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_config_that_does_not_match_the_tensors_names_the_tensor(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(
        tiny_model_dir, tmp_path / "bad", "gptq", config_edit=lambda c: c.update(intermediate_size=96)
    )
    _fails(checkpoint, str(checkpoint / "model.safetensors"), "model.layers.0.mlp.gate_proj.qweight", "[8, 96]")


def _edit_tensors(checkpoint: Path, edit) -> None:
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(checkpoint / "model.safetensors"))


def test_a_missing_scale_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / "bad", "awq")
    _edit_tensors(checkpoint, lambda t: t.pop("model.layers.1.self_attn.o_proj.scales"))
    _fails(checkpoint, "model.layers.1.self_attn.o_proj.scales", "missing")


def test_a_group_index_out_of_range_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / "bad", "gptq")
    _edit_tensors(checkpoint, lambda t: t["model.layers.0.mlp.down_proj.g_idx"].__setitem__(0, 99))
    _fails(checkpoint, "model.layers.0.mlp.down_proj.g_idx", "out of 0..3")


def test_a_packed_tensor_with_no_linear_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / "bad", "gptq")
    _edit_tensors(
        checkpoint, lambda t: t.update({"model.layers.0.mlp.extra.qzeros": torch.zeros(1, 1, dtype=torch.int32)})
    )
    _fails(checkpoint, "model.layers.0.mlp.extra.qzeros", "belongs to no linear")


def test_a_truncated_file_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / "bad", "gptq")
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _fails(checkpoint, str(path), "not a readable safetensors file")


def test_a_float_tensor_of_the_wrong_shape_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / "bad", "awq")
    _edit_tensors(checkpoint, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.float16)}))
    _fails(checkpoint, "model.norm.weight", "[32]", "[64]")


def test_config_json_is_rewritten_nowhere(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / "ok", "gptq", sym=True)
    before = (checkpoint / "config.json").read_text()
    load_hf_quantized(checkpoint)
    assert (checkpoint / "config.json").read_text() == before
    assert json.loads(before)["quantization_config"]["quant_method"] == "gptq"
