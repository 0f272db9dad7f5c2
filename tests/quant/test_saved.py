"""Our saved pre-quantized format: round trip per mode, loading without float weights, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quant
import quant.saved as saved
from quant.calibration import CalibrationContext
from quant.checkpoints import load_float_model
from quant.prequantized import SAVED_MANIFEST, PrequantizedError
from quant.saved import load_saved, save_quantized

PROMPT = torch.tensor([[1, 5, 9, 20, 33, 7, 100, 2]])
SAVED_MODES = ["int4", "int8", "int8-dynamic", "nf4", "fp8", "bf16", "fp32", "int4-gptq", "int4-awq", "int8-static"]


def _quantized(model_dir: Path, mode: str, **knobs):
    model, tokenizer, model_id = load_float_model(str(model_dir), device="cpu")
    options = quant.QuantOptions(**{"calibration_tokens": 512, **knobs})
    calibration = CalibrationContext(tokenizer, model_id)  # calibrated modes save what they calibrated
    report = quant.quantize_(model, quant.make_config(mode, options), calibration=calibration)
    return model, tokenizer, model_id, report, options


def _save(model_dir: Path, out: Path, mode: str, **knobs):
    model, tokenizer, model_id, report, options = _quantized(model_dir, mode, **knobs)
    save_quantized(model, tokenizer, report, out, options=options, source_model=str(model_dir), model_id=model_id)
    return model, report


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROMPT).logits


@pytest.mark.parametrize("mode", SAVED_MODES)
def test_saved_checkpoint_serves_the_same_logits_and_bytes(tiny_model_dir: Path, tmp_path: Path, mode: str) -> None:
    original, report = _save(tiny_model_dir, tmp_path / mode, mode, group_size=32)
    loaded, _, model_id, loaded_report = load_saved(tmp_path / mode)
    assert torch.equal(_logits(loaded), _logits(original))  # the same stored numbers, the same kernels
    assert loaded_report.mode == mode
    assert loaded_report.total_weight_bytes == report.total_weight_bytes
    assert loaded_report.layers_quantized == report.layers_quantized
    assert loaded_report.kernels == report.kernels
    assert loaded_report.lm_head == report.lm_head
    assert mode in model_id


def test_the_shared_head_table_is_stored_once_and_shared_again(tiny_model_dir: Path, tmp_path: Path) -> None:
    _save(tiny_model_dir, tmp_path / "int4", "int4", group_size=32)
    stored = load_file(tmp_path / "int4" / saved.WEIGHTS_FILE)
    manifest = json.loads((tmp_path / "int4" / SAVED_MANIFEST).read_text())
    assert "model.embed_tokens.weight_int8" in stored and "lm_head.weight_int8" not in stored
    assert manifest["aliases"]["lm_head.weight_int8"] == "model.embed_tokens.weight_int8"
    model, *_ = load_saved(tmp_path / "int4")
    assert model.model.embed_tokens.weight_int8.data_ptr() == model.lm_head.weight_int8.data_ptr()


def test_manifest_records_mode_knobs_and_report(tiny_model_dir: Path, tmp_path: Path) -> None:
    _save(tiny_model_dir, tmp_path / "int4", "int4", group_size=32)
    manifest = json.loads((tmp_path / "int4" / SAVED_MANIFEST).read_text())
    assert manifest["mode"] == "int4" and manifest["options"]["group_size"] == 32
    assert manifest["calibration"] is None
    assert manifest["modules"]["model.layers.0.mlp.down_proj"] == {
        "class": "Int4WeightOnlyLinear",
        "in_features": 128,
        "out_features": 64,
        "bias": False,
        "arguments": {"group_size": 32},
    }
    assert manifest["report"]["layers_quantized"] == 15


def test_loading_never_builds_float_weights(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    _save(tiny_model_dir, tmp_path / "int4", "int4", group_size=32)
    skeletons = []

    def recording_skeleton(config):
        model = saved_skeleton(config)
        skeletons.append(all(p.is_meta for p in model.parameters()))
        return model

    saved_skeleton = saved.empty_skeleton
    monkeypatch.setattr(saved, "empty_skeleton", recording_skeleton)
    monkeypatch.setattr("quant.checkpoints.load_float_model", lambda *a, **k: pytest.fail("float model loaded"))
    model, *_ = load_saved(tmp_path / "int4")
    assert skeletons == [True]  # every parameter of the skeleton was on the meta device
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


# --- bad input: each fails with one line naming the file and the tensor ---------------------------


@pytest.fixture
def saved_int4(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "int4"
    _save(tiny_model_dir, out, "int4", group_size=32)
    return out


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / SAVED_MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _rewrite_weights(directory: Path, edit) -> None:
    """Change the stored tensors and record the new file's hash (a consistent but wrong checkpoint)."""
    path = directory / saved.WEIGHTS_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))
    _edit_manifest(directory, lambda m: m["weights"].update(sha256=saved.file_sha256(path)))


def _fails(directory: Path, *fragments: str) -> None:
    with pytest.raises(PrequantizedError) as caught:
        load_saved(directory)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_truncated_weights_fail_naming_the_file(saved_int4: Path) -> None:
    path = saved_int4 / saved.WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-1000])
    _fails(saved_int4, str(path), "SHA-256")


def test_truncated_weights_without_a_hash_fail_in_safetensors(saved_int4: Path) -> None:
    path = saved_int4 / saved.WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-1000])
    _edit_manifest(saved_int4, lambda m: m["weights"].update(sha256=None))
    _fails(saved_int4, str(path), "not a readable safetensors file")


def test_corrupt_header_fails(saved_int4: Path) -> None:
    path = saved_int4 / saved.WEIGHTS_FILE
    path.write_bytes(b"\xff" * 8 + b"{not json" + path.read_bytes()[17:])
    _edit_manifest(saved_int4, lambda m: m["weights"].update(sha256=None))
    _fails(saved_int4, str(path), "not a readable safetensors file")


def test_missing_weights_file_fails(saved_int4: Path) -> None:
    (saved_int4 / saved.WEIGHTS_FILE).unlink()
    _fails(saved_int4, "the weights file is missing")


def test_a_missing_tensor_is_named(saved_int4: Path) -> None:
    _rewrite_weights(saved_int4, lambda t: t.pop("model.layers.1.mlp.up_proj.scales"))
    _fails(saved_int4, "model.layers.1.mlp.up_proj.scales", "missing")


def test_an_unexpected_tensor_is_named(saved_int4: Path) -> None:
    _rewrite_weights(saved_int4, lambda t: t.update({"model.layers.9.extra": torch.zeros(2)}))
    _fails(saved_int4, "model.layers.9.extra", "not part of the model")


def test_a_tensor_of_the_wrong_shape_is_named(saved_int4: Path) -> None:
    _rewrite_weights(saved_int4, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    _fails(saved_int4, "model.norm.weight", "[65]", "[64]")


def test_a_tensor_of_the_wrong_dtype_is_named(saved_int4: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.scales"
    _rewrite_weights(saved_int4, lambda t: t.update({name: t[name].float()}))
    _fails(saved_int4, name, "torch.float32", "torch.float16")


def test_a_config_that_does_not_match_the_layers_fails(saved_int4: Path) -> None:
    config = json.loads((saved_int4 / "config.json").read_text())
    config["intermediate_size"] = 96
    (saved_int4 / "config.json").write_text(json.dumps(config))
    _fails(saved_int4, "model.layers.0.mlp.gate_proj", "64->128", "64->96")


def test_an_unknown_layer_class_fails(saved_int4: Path) -> None:
    name = "model.layers.0.mlp.up_proj"
    _edit_manifest(saved_int4, lambda m: m["modules"][name].update({"class": "Int3Linear"}))
    _fails(saved_int4, name, "Int3Linear")


def test_a_manifest_that_is_not_json_fails(saved_int4: Path) -> None:
    (saved_int4 / SAVED_MANIFEST).write_text("{truncated")
    _fails(saved_int4, str(saved_int4 / SAVED_MANIFEST), "JSON")


def test_a_newer_format_version_fails(saved_int4: Path) -> None:
    _edit_manifest(saved_int4, lambda m: m.update(version=99))
    _fails(saved_int4, "version 99")


def test_a_layer_whose_state_is_not_in_its_buffers_cannot_be_saved(tiny_model_dir: Path) -> None:
    from quant.layers.int8 import Int8WeightOnlyLinear

    class OutsideState(Int8WeightOnlyLinear):  # stands for bitsandbytes' layers, whose state lives elsewhere
        pass

    model, *_ = _quantized(tiny_model_dir, "int8")
    model.model.layers[0].mlp.up_proj = OutsideState(64, 128)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj \(OutsideState\) cannot be saved"):
        saved._module_specs(model)
