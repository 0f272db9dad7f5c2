"""quantserve-qat end to end on the tiny model: it trains, says what it saw, and saves a checkpoint that
the int4 mode serves with exactly the trained weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quant
from quant.calibration import calibration_sequences, read_calibration_text
from quant.checkpoints import load_float_model
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.qat import int4_on_grid, qat_linears, round_tied_head
from tests.conftest import build_tiny_llama
from tools import qat

GROUP = 32


def _kl_on(model: torch.nn.Module, teacher: torch.nn.Module, sequences: torch.Tensor) -> float:
    with torch.no_grad():
        return qat.kl_from_teacher(model(input_ids=sequences).logits, teacher(input_ids=sequences).logits).item()


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with weights large enough (as a trained model's) that its predictions are peaked
    and int4 visibly changes them; with the default 0.02 the outputs are near uniform."""
    return build_tiny_llama(tmp_path_factory.mktemp("peaked"), initializer_range=0.25)


@pytest.fixture(scope="module")
def trained(peaked_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qat") / "ckpt"
    args = ["--model", str(peaked_model_dir), "--mode", "int4", "--group-size", str(GROUP), "--out", str(out)]
    args += ["--steps", "24", "--calibration-tokens", "1024", "--sequence-length", "128", "--lr", "1e-3"]
    assert qat.main(args) == 0
    return out


def test_the_checkpoint_records_what_training_saw(trained: Path) -> None:
    record = json.loads((trained / "qat.json").read_text())
    assert record["mode"] == "int4" and record["group_size"] == GROUP
    assert record["steps"] == 24 and record["tokens_seen"] == 24 * 128
    assert record["calibration_source"] == "pydoc_data.topics" and len(record["losses"]) == 24


def test_serving_the_checkpoint_in_int4_reproduces_the_trained_weights(trained: Path) -> None:
    saved, _, _ = load_float_model(str(trained))
    config = quant.make_config("int4", quant.QuantOptions(group_size=GROUP))
    weights = {name: linear.weight.detach().clone() for name, linear in qat_linears(saved, config).items()}
    report = quant.quantize_(saved, config)
    assert report.layers_quantized == len(weights) + 1  # and the head
    for name, weight in weights.items():
        layer = saved.get_submodule(name)
        assert isinstance(layer, Int4WeightOnlyLinear) and torch.equal(layer.dequantize_weight(), weight), name


def test_training_brings_the_int4_model_closer_to_the_float_one(peaked_model_dir: Path, trained: Path) -> None:
    teacher, tokenizer, _ = load_float_model(str(peaked_model_dir))
    config = quant.make_config("int4", quant.QuantOptions(group_size=GROUP))
    round_tied_head(teacher, config)
    rtn, _, _ = load_float_model(str(peaked_model_dir))
    round_tied_head(rtn, config)
    with torch.no_grad():
        for linear in qat_linears(rtn, config).values():
            linear.weight.copy_(int4_on_grid(linear.weight, GROUP))
    trained_model, _, _ = load_float_model(str(trained))
    text, _ = read_calibration_text("")
    sequences = calibration_sequences(tokenizer, text, 1024, 128)
    trained_kl, rtn_kl = _kl_on(trained_model, teacher, sequences), _kl_on(rtn, teacher, sequences)
    assert rtn_kl > 0.01 and trained_kl < 0.8 * rtn_kl, (trained_kl, rtn_kl)


def test_modes_without_a_fake_quantizer_are_refused_before_loading(tmp_path: Path, capsys) -> None:
    assert qat.main(["--mode", "int4-hqq", "--out", str(tmp_path / "x"), "--model", "/nonexistent"]) == 2
    assert "QAT supports int4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_budget_beyond_the_text_names_the_variable(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    args = ["--model", str(tiny_model_dir), "--mode", "int4", "--out", str(tmp_path / "x")]
    assert qat.main([*args, "--calibration-file", str(short), "--calibration-tokens", "4096"]) == 2
    assert "QS_CALIBRATION_TOKENS" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.real_model
def test_default_model_checkpoint_serves_its_trained_int4_weights_exactly(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "qat"
    args = ["--mode", "int4", "--group-size", "64", "--out", str(out), "--cache-dir", str(cache_dir), "--steps", "2"]
    assert qat.main([*args, "--calibration-tokens", "512", "--sequence-length", "256", "--lr", "1e-4"]) == 0
    assert json.loads((out / "qat.json").read_text())["tokens_seen"] == 512
    model, _, _ = load_float_model(str(out))
    report = quant.quantize_(model, quant.make_config("int4", quant.QuantOptions(group_size=64)))
    assert report.layers_quantized == 211 and report.error_summary()["exact"]  # 210 linears and the int8 head
