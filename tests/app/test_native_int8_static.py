"""The native decode step's int8_static kind against the torch path, on a calibrated tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import quant
from app.engine.llama_runner import LlamaRunner
from app.engine.native_runner import NativeRunner, linear_spec
from quant.calibration import CalibrationContext
from quant.layers.int8_static import Int8StaticLinear
from tests.app.test_native_runner import CPU, MAX_LEN, TINY, check_phases, greedy, near
from tests.app.test_native_runner import PROMPTS as NATIVE_PROMPTS


class ByteTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [b % TINY["vocab_size"] for b in text.encode()]}


@pytest.fixture(scope="module")
def static_model() -> nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    config = quant.make_config("int8-static", quant.QuantOptions(calibration_tokens=2048))
    report = quant.quantize_(model, config, calibration=CalibrationContext(ByteTokenizer(), "tiny", None))
    assert report.layers_fallback == 0
    return model


def test_the_decoder_takes_each_layer_with_its_calibrated_scale(static_model) -> None:
    layer = static_model.model.layers[0].self_attn.o_proj
    assert type(layer) is Int8StaticLinear
    kind, tensors, _, _ = linear_spec(layer)
    assert kind == "int8_static" and tensors[2] is layer.act_scale
    # down_proj's input is quantized per token (dynamic_activation_modules): int8-dynamic's kind
    assert linear_spec(static_model.model.layers[0].mlp.down_proj)[0] == "int8_row"


def test_every_phase_as_the_torch_ops(static_model, isa) -> None:
    """The native step quantizes each input with the layer's fixed scale, as the torch op does."""
    runner = NativeRunner(static_model, CPU, 2, MAX_LEN)
    runner.prefill(0, NATIVE_PROMPTS[0])
    runner.prefill(1, NATIVE_PROMPTS[1])
    runner.record_inputs(True)
    logits = runner.decode([0, 1], [7, 8])
    expected = check_phases(runner, static_model, [0, 1], [len(NATIVE_PROMPTS[0]), len(NATIVE_PROMPTS[1])], [7, 8])
    near(logits, expected, "head")


def test_greedy_runs_match_the_lean_runner(static_model, isa) -> None:
    expected = greedy(LlamaRunner(static_model, CPU, 3, MAX_LEN), [0, 1, 2], NATIVE_PROMPTS, steps=12)
    actual = greedy(NativeRunner(static_model, CPU, 3, MAX_LEN), [0, 1, 2], NATIVE_PROMPTS, steps=12)
    for got, want in zip(actual, expected, strict=True):
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
        near(got, want, "int8-static logits", 1e-5)


def test_readers_of_one_input_with_different_scales_are_refused(static_model) -> None:
    model = copy.deepcopy(static_model)
    model.model.layers[1].self_attn.k_proj.act_scale.mul_(2)
    with pytest.raises(RuntimeError, match="different static activation scales"):
        NativeRunner(model, CPU, 1, MAX_LEN)
