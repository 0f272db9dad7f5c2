"""int4-gptq and int4-awq end to end on the tiny Llama: layer-by-layer calibration, int4 storage, the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import quant
from quant.calibration import CalibrationContext, CalibrationError
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.layerwise import GROUPS, decoder_layers, first_layer_inputs, run_layer
from tests.support.tiny_calibration import load_tiny_llama, tiny_llama_and_sequences, tiny_sequences

CALIBRATED_INT4 = ("int4-gptq", "int4-awq")
OPTIONS = quant.QuantOptions(group_size=32, calibration_tokens=1024)


@pytest.fixture
def tiny_llama(tiny_model_dir: Path):
    return tiny_llama_and_sequences(tiny_model_dir)


def test_the_staged_layer_run_is_the_layers_own_forward(tiny_llama) -> None:
    model, sequences = tiny_llama
    inputs = first_layer_inputs(model, sequences, 2)
    assert len(inputs) == 2 and inputs[0][0].shape == (2, 64, model.config.hidden_size)
    seen: list[tuple[str, tuple[str, ...], int]] = []
    outputs = run_layer(
        model.model.layers[0], 0, inputs, lambda g: seen.append((g.group, tuple(g.linears), g.stats.tokens))
    )
    assert [group for group, _, _ in seen] == list(GROUPS)
    assert seen[0][1] == tuple(f"model.layers.0.{n}" for n in GROUPS["attention_in"])
    assert all(tokens == sequences.numel() for _, _, tokens in seen)
    with torch.no_grad():
        for (hidden, kwargs), (output, _) in zip(inputs, outputs, strict=True):
            torch.testing.assert_close(output, model.model.layers[0](hidden, **kwargs), rtol=0, atol=0)


def test_a_model_without_llama_layers_is_refused_clearly() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(CalibrationError, match="Llama-family"):
        decoder_layers(model)


def held_out_error(model, float_logits: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return ((model(ids).logits - float_logits).norm() / float_logits.norm()).item()


@pytest.mark.parametrize("mode", CALIBRATED_INT4)
def test_calibrated_int4_beats_round_to_nearest_and_is_cached(mode: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    context = CalibrationContext(tokenizer, "tiny", tmp_path)
    # held out: tokens after the calibration budget's 1024
    ids = tiny_sequences(tiny_model_dir, 4096, 128)[-4:]
    load = lambda: load_tiny_llama(tiny_model_dir)  # noqa: E731
    float_model = load()
    with torch.no_grad():
        float_logits = float_model(ids).logits
    rtn = load()
    quant.quantize_(rtn, quant.make_config("int4", OPTIONS))
    calibrated = load()
    report = quant.quantize_(calibrated, quant.make_config(mode, OPTIONS), calibration=context)
    assert report.calibration is not None and not report.calibration.cached
    assert report.calibration.tokens == 1024
    assert (report.layers_quantized, report.layers_fallback) == (15, 0)  # 2 x 7 linears and the int8 head
    layers = {n: m for n, m in calibrated.named_modules() if isinstance(m, Int4WeightOnlyLinear)}
    assert len(layers) == 14 and all(m.group_size == 32 for m in layers.values())
    assert held_out_error(calibrated, float_logits, ids) < 0.9 * held_out_error(rtn, float_logits, ids)

    again = load()
    second = quant.quantize_(again, quant.make_config(mode, OPTIONS), calibration=context)
    assert second.calibration.cached and second.calibration.seconds == report.calibration.seconds
    for name, module in again.named_modules():
        if isinstance(module, Int4WeightOnlyLinear):
            for buffer in ("packed", "scales", "mins"):
                assert torch.equal(getattr(module, buffer), getattr(layers[name], buffer)), (name, buffer)


def test_gptq_serves_its_own_solution_not_a_requantization(tiny_model_dir: Path) -> None:
    model, sequences = tiny_llama_and_sequences(tiny_model_dir, tokens=1024, length=128)
    config = quant.make_config("int4-gptq", OPTIONS)
    state, details = config.calibrate(model, sequences)
    assert details["act_order"] and details["layers"] == 14
    float_weight = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    layer = config.quantize_linear(model.model.layers[1].mlp.down_proj)
    assert torch.equal(layer.packed, state["model.layers.1.mlp.down_proj.packed"])
    assert torch.equal(layer.scales, state["model.layers.1.mlp.down_proj.scales"])
    rtn = quant.make_config("int4", OPTIONS).quantize_linear(model.model.layers[1].mlp.down_proj)
    assert not torch.equal(layer.packed, rtn.packed)  # GPTQ moved codes that round-to-nearest would not
    # the float model keeps its own weights (the report's errors are measured against them)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, float_weight)


@pytest.mark.parametrize("mode", CALIBRATED_INT4)
def test_calibrated_int4_needs_calibration_text(mode: str, tiny_model_dir: Path) -> None:
    model = load_tiny_llama(tiny_model_dir)
    with pytest.raises(CalibrationError, match=f"{mode} is a calibrated mode"):
        quant.quantize_(model, quant.make_config(mode, OPTIONS))


@pytest.mark.parametrize("mode", CALIBRATED_INT4)
def test_the_service_loads_and_decodes_natively_in_calibrated_int4(
    mode: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from app.engine.native_runner import native_unsupported_reason
    from app.model_loader import load_model
    from app.settings import load_settings

    settings = load_settings(
        model=str(tiny_model_dir), precision=mode, group_size=32, calibration_tokens=1024, cache_dir=tmp_path
    )
    loaded = load_model(settings)
    calibration = loaded.report.calibration
    assert calibration is not None and (calibration.source, calibration.tokens) == ("pydoc_data.topics", 1024)
    assert native_unsupported_reason(loaded.model) is None  # int4's storage: the native decode step serves it
