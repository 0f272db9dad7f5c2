"""Every precision mode: layer error bounds, GPT-2 Conv1D, tied heads, skips, fallbacks, and the real model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import quant
from app.model_loader import LoadedModel
from quant.layers.base import QuantizedLinear
from quant.layers.int8_grouped import Int8G32Embedding, Int8G32Linear
from tests.conftest import greedy_complete
from tests.support import tiny_shapes as tiny
from tests.support.modes import (
    ALL_MODES,
    BNB_MODES,
    CALIBRATED_MODES,
    CALIBRATION_FREE_QUANTIZED_MODES,
    FLOAT_MODES,
    ISSUE_FLOAT_MODES,
    QUANTIZED_MODES,
    bits,
)

ACTIVATION_QUANTIZING_MODES = [m for m in ALL_MODES if quant.get_mode(m).quantizes_activations]

# Relative output error ||y_q - y|| / ||y|| of one quantized layer against its float layer,
# for weights ~ N(0, 0.02²) [128 x 256] and activations ~ N(0, 1). For random inputs it
# tracks the weights' relative rms error: int8 absmax per channel gives step max|w|/127,
# rms step/√12 ≈ 0.7% of rms(w); per-token int8 activations add about as much (W8A8);
# float8 keeps 3 (e4m3) or 2 (e5m2) mantissa bits, ≈ 2.6% / 5.3%; 4-bit codes at group
# 64 give ≈ 9%, FP4's uneven levels ≈ 12%. Measured values (three seeds) are in comments;
# each bound leaves about 1.5x room.
LAYER_ERROR_BOUND = {
    "int8": 0.015,  # measured 0.009
    "int8-dynamic": 0.02,  # 0.010
    "int8-mixed": 0.02,  # 0.010 (no outliers in Gaussian inputs: same path as int8-dynamic)
    "bnb-int8": 0.02,  # 0.010
    "fp8": 0.04,  # 0.026 (e4m3)
    "int4": 0.13,  # 0.092
    "int4-hqq": 0.13,  # 0.089
    # a linear given no calibration (outside the decoder layers) is int4's round-to-nearest
    "int4-gptq": 0.13,  # 0.092
    "int4-awq": 0.13,  # 0.092
    "nf4": 0.13,  # 0.092
    "bnb-nf4": 0.13,  # 0.092
    "bnb-fp4": 0.17,  # 0.122
}
FP8_E5M2_BOUND = 0.08  # measured 0.053

# Bytes of the quantized layers over the same layers in fp32 (issue 4), by bits per weight.
BYTES_RATIO_BOUND_BY_BITS = {8: 0.27, 4: 0.16}
BYTES_RATIO_BOUND = {m: BYTES_RATIO_BOUND_BY_BITS[bits(m)] for m in QUANTIZED_MODES}


def bitsandbytes_missing() -> str | None:
    try:
        quant.make_config("bnb-int8").check_available()
    except quant.ModeUnavailableError as error:
        return str(error)
    return None


def mode_param(mode: str, *, slow_if_calibrated: bool = False):
    reason = bitsandbytes_missing() if mode in BNB_MODES else None
    marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
    if slow_if_calibrated and mode in CALIBRATED_MODES:
        marks.append(pytest.mark.slow)  # the first load calibrates on the default model: minutes
    return pytest.param(mode, marks=marks)


def random_linear(seed: int, in_features: int = 256, out_features: int = 128) -> tuple[nn.Linear, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
        linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.01)
    return linear, torch.randn(16, in_features, generator=generator)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def test_every_issue_mode_is_registered() -> None:
    expected = {*ISSUE_FLOAT_MODES, *LAYER_ERROR_BOUND}
    assert expected <= set(ALL_MODES)
    assert set(ISSUE_FLOAT_MODES) <= set(FLOAT_MODES)  # registered as float modes: the whole model cast


@pytest.mark.parametrize("mode", [mode_param(m) for m in CALIBRATION_FREE_QUANTIZED_MODES])
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_output_error_within_mode_bound(mode: str, seed: int) -> None:
    linear, x = random_linear(seed)
    layer = quant.make_config(mode).quantize_linear(linear)
    assert isinstance(layer, QuantizedLinear)
    with torch.no_grad():
        error = relative_error(layer(x), linear(x))
        # the weight the layer reports (for error reports) is the one it applies
        applied = torch.nn.functional.linear(x, layer.dequantize_weight(), linear.bias)
    assert error <= LAYER_ERROR_BOUND[mode]
    weight_error = relative_error(applied, linear(x))
    assert weight_error <= error * 1.05  # rounding of the activations (if any) only adds
    if mode not in ACTIVATION_QUANTIZING_MODES:
        # weight-only by storage; a CPU kernel may still round activations to int8 blocks
        assert weight_error == pytest.approx(error, rel=0.25)


def test_fp8_e5m2_layer_error_within_bound() -> None:
    linear, x = random_linear(0)
    config = quant.make_config("fp8", quant.QuantOptions(fp8_format="e5m2"))
    layer = config.quantize_linear(linear)
    assert layer.weight_fp8.dtype == torch.float8_e5m2
    with torch.no_grad():
        error = relative_error(layer(x), linear(x))
    assert LAYER_ERROR_BOUND["fp8"] < error <= FP8_E5M2_BOUND  # less precise than e4m3, as it should be


@pytest.mark.parametrize("mode", ["int8-mixed", mode_param("bnb-int8")])
def test_mixed_int8_keeps_outlier_features_precise(mode: str) -> None:
    linear, x = random_linear(0)
    x[:, [3, 100]] *= 40.0  # two outlier features, as LLM.int8() describes
    mixed = quant.make_config(mode).quantize_linear(linear)
    dynamic = quant.make_config("int8-dynamic").quantize_linear(linear)
    with torch.no_grad():
        exact = linear(x)
        mixed_error, dynamic_error = relative_error(mixed(x), exact), relative_error(dynamic(x), exact)
    assert mixed_error < dynamic_error / 2
    assert mixed_error <= LAYER_ERROR_BOUND[mode]


def test_int4_hqq_is_not_worse_than_min_max() -> None:
    linear, x = random_linear(0)
    minmax, hqq = (
        quant.make_config("int4").quantize_linear(linear),
        quant.make_config("int4-hqq").quantize_linear(linear),
    )
    assert torch.equal(minmax.scales, hqq.scales)  # same storage, same scales; only zero points move
    with torch.no_grad():
        assert relative_error(hqq(x), linear(x)) < relative_error(minmax(x), linear(x))


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=128, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("mode", [mode_param(m) for m in CALIBRATION_FREE_QUANTIZED_MODES])
def test_gpt2_conv1d_quantized_and_tied_head_kept_float_when_asked(mode: str) -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids).logits
    report = quant.quantize_(model, quant.make_config(mode, quant.QuantOptions(quantize_lm_head="false")))
    # 4 Conv1D per block (c_attn, attn c_proj, c_fc, mlp c_proj); the tied head is skipped
    assert (report.layers_quantized, report.layers_skipped, report.layers_fallback) == (8, 1, 0)
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantizedLinear)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert report.quantized_ratio <= BYTES_RATIO_BOUND[mode]
    with torch.no_grad():
        assert relative_error(model(ids).logits, exact) <= 2 * LAYER_ERROR_BOUND[mode]
    assert quant.module_bytes(model) == report.total_weight_bytes  # serving did not change the storage
    assert len(report.layer_errors) == 8 and all(e.sqnr_db > 10 for e in report.layer_errors)


@pytest.mark.parametrize("mode", [mode_param(m) for m in CALIBRATION_FREE_QUANTIZED_MODES])
def test_tied_head_becomes_int8_g32_by_default_and_the_embedding_reads_its_table(mode: str) -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    float_head = model.lm_head.weight.detach().clone()
    report = quant.quantize_(model, quant.make_config(mode))
    assert (report.layers_quantized, report.layers_skipped, report.layers_fallback) == (9, 0, 0)
    assert isinstance(model.lm_head, Int8G32Linear) and report.lm_head == "int8-g32 (shared with the embedding)"
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, Int8G32Embedding)
    # one table: the embedding's buffers are the head's tensors, and the bytes count them once
    assert embedding.weight_int8.data_ptr() == model.lm_head.weight_int8.data_ptr()
    assert embedding.scales.data_ptr() == model.lm_head.scales.data_ptr()
    assert quant.module_bytes(model) == report.total_weight_bytes
    # rows read back the head's de-quantized weight, within half a step of the float one
    rows = embedding(torch.arange(128))
    assert torch.equal(rows, model.lm_head.dequantize_weight())
    step = model.lm_head.scales.float().repeat_interleave(32, dim=1)
    assert ((rows - float_head).abs() <= step / 2 + 1e-6).all()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_quantize_lm_head_false_keeps_the_tied_head_float_in_every_way() -> None:
    model = tiny_gpt2()
    report = quant.quantize_(model, quant.make_config("int4", quant.QuantOptions(quantize_lm_head=False)))
    assert report.lm_head == "float" and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_lm_head_unties_and_quantizes_it(mode: str) -> None:
    model = tiny_gpt2()
    embedding = model.transformer.wte.weight.detach().clone()
    options = quant.QuantOptions(quantize_lm_head=True)
    report = quant.quantize_(model, quant.make_config(mode, options))
    assert report.layers_quantized == 9 and report.layers_skipped == 0
    assert isinstance(model.lm_head, QuantizedLinear)
    assert torch.equal(model.transformer.wte.weight, embedding)  # the embedding stays float
    assert model.config.tie_word_embeddings is False


def load_tiny(tiny_model_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_skip_modules_keep_matching_layers_float(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir)
    # the tied head kept float (its default, int8 g32, has its own test): hand counts below
    options = quant.QuantOptions(skip_modules=("down_proj", "model.layers.0.self_attn.*"), quantize_lm_head=False)
    report = quant.quantize_(model, quant.make_config("int8", options))
    layers = model.model.layers
    assert type(layers[0].mlp.down_proj) is nn.Linear and type(layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(layers[1].self_attn.q_proj, QuantizedLinear)
    # 2 layers x 7 linears + head: 2 down_proj + 4 attention of layer 0 + the tied head skipped
    assert (report.layers_quantized, report.layers_skipped) == (8, 7)
    # bytes counted by hand from the shapes: what stays float, and the 8 int8 layers
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    float_bytes = (
        tiny.always_float_bytes()
        + tiny.LAYERS * tiny.float_linear_bytes("down_proj")
        + sum(tiny.float_linear_bytes(n) for n in attention)
    )
    quantized = [*attention, "gate_proj", "up_proj"]  # layer 1; layer 0 only gate_proj and up_proj
    quantized_bytes = sum(tiny.int8_linear_bytes(n) for n in [*quantized, "gate_proj", "up_proj"])
    assert report.float_bytes == float_bytes
    assert report.quantized_layers_bytes == quantized_bytes
    assert report.total_weight_bytes == float_bytes + quantized_bytes


def test_shapes_the_kernel_cannot_take_fall_back_and_are_counted(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_tiny(tiny_model_dir)  # hidden 64, intermediate 128
    options = quant.QuantOptions(group_size=128, quantize_lm_head=False)
    with caplog.at_level(logging.WARNING, logger="quant.api"):
        report = quant.quantize_(model, quant.make_config("int4", options))
    # only down_proj (128 inputs) fits groups of 128; the 6 linears with 64 inputs per layer fall back
    assert (report.layers_quantized, report.layers_fallback) == (2, 12)
    assert report.summary()["layers_fallback"] == 12
    assert "12 layer(s) fell back to float" in caplog.text
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_report_counts_bytes_and_errors(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir)
    fp32_bytes = quant.module_bytes(model)
    assert fp32_bytes == tiny.fp32_model_bytes()  # the hand count from the shapes
    report = quant.quantize_(model, quant.make_config("int4"))
    summary = report.summary()
    assert report.total_weight_bytes == quant.module_bytes(model) < fp32_bytes
    assert summary["errors"]["worst_layer"] in {e.name for e in report.layer_errors}
    assert 0 < summary["errors"]["mean_relative_error"] < 0.2
    assert summary["errors"]["worst_sqnr_db"] <= summary["errors"]["mean_sqnr_db"]


def test_invalid_mode_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="group size"):
        quant.make_config("int4", quant.QuantOptions(group_size=48))
    with pytest.raises(ValueError, match="fp8 format"):
        quant.make_config("fp8", quant.QuantOptions(fp8_format="e3m4"))


@pytest.mark.parametrize("mode", BNB_MODES)
def test_bitsandbytes_missing_fails_with_one_line(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(quant.ModeUnavailableError) as error:
        quant.quantize_(tiny_gpt2(), quant.make_config(mode))
    message = str(error.value)
    assert "\n" not in message and mode in message and "bitsandbytes" in message


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", [mode_param(m) for m in CALIBRATION_FREE_QUANTIZED_MODES])
def test_modes_run_on_cuda(mode: str) -> None:
    model = tiny_gpt2().cuda()
    ids = torch.randint(0, 128, (2, 12), device="cuda")
    with torch.no_grad():
        exact = model(ids).logits
    report = quant.quantize_(model, quant.make_config(mode, quant.QuantOptions(device="cuda")))
    assert report.layers_quantized == 8
    with torch.no_grad():
        assert relative_error(model(ids).logits, exact) <= 2 * LAYER_ERROR_BOUND[mode]


# Greedy completion of "The capital of France is" on the default model. Every mode
# passes here; a mode whose quality did not allow it would be listed with the reason.
@pytest.mark.real_model
@pytest.mark.parametrize("mode", [mode_param(m, slow_if_calibrated=True) for m in ALL_MODES])
def test_real_model_mode_answers_paris(mode: str, real_model: Callable[..., LoadedModel]) -> None:
    loaded = real_model(mode)
    report = loaded.report
    assert "Paris" in greedy_complete(loaded, "The capital of France is", max_new_tokens=4)
    if mode in FLOAT_MODES:
        assert report.layers_quantized == 0
        return
    # 30 blocks x 7 linears in the mode, and the tied head as int8 g32 (QS_QUANTIZE_LM_HEAD=auto)
    assert (report.layers_quantized, report.layers_skipped, report.layers_fallback) == (211, 0, 0)
    assert type(loaded.model.lm_head) is Int8G32Linear
    # the mode's own storage meets its budget (the head is int8, whatever the mode)
    body = [m for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear) and n != "lm_head"]
    body_fp32 = sum(m.in_features * m.out_features * 4 for m in body)
    assert quant.module_bytes(nn.ModuleList(body)) / body_fp32 <= BYTES_RATIO_BOUND[mode]
    # the GGUF stores token_embd as Q8_0, which this layout reproduces exactly
    head_error = next(e for e in report.layer_errors if e.name == "lm_head")
    assert head_error.exact


@pytest.mark.parametrize("first", ["int8", mode_param("bnb-int8")])
def test_quantizing_twice_leaves_quantized_layers_alone(first: str) -> None:
    model = tiny_gpt2()
    quant.quantize_(model, quant.make_config(first))
    layer = model.transformer.h[0].mlp.c_fc
    again = quant.quantize_(model, quant.make_config("int4"))
    # neither the quantized layers nor what they hold inside (bitsandbytes' own nn.Linear)
    assert again.layers_quantized == 0
    assert model.transformer.h[0].mlp.c_fc is layer
