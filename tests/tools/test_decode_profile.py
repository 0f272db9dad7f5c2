"""The per-token breakdown command on the tiny model: real timings for their order, fixed ones for the arithmetic."""

from __future__ import annotations

import pytest
from torch import nn

import quant
from app.engine.llama_runner import LlamaRunner
from app.engine.runner import ModelRunner
from quant.checkpoints import load_float_model
from tools import decode_profile as profile
from tools.decode_profile import linear_layers, profile_precision


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_breakdown_rows(tiny_model_dir, tmp_path, precision):
    rows = profile_precision(
        precision, steps=3, repeats=2, prompt_tokens=8, model=str(tiny_model_dir), cache_dir=tmp_path
    )
    assert set(rows) == {"HFRunner", "LlamaRunner", "NativeRunner"}  # the tiny model takes the native step
    for name, row in rows.items():
        assert 0 < row["p10"] <= row["total"] <= row["p90"]
        if name == "NativeRunner":  # its own repacked weights: torch's linears are not what it runs
            assert row["linears"] is None and row["rest"] is None
        else:
            assert row["linears"] > 0


def test_breakdown_figures_from_known_step_times(tiny_model_dir, tmp_path, monkeypatch):
    # Each timer returns fixed per-step times, so medians, deciles and "rest" are known by hand.
    def fake_decode(runner: ModelRunner, prompt: list[int], steps: int, clock) -> list[float]:
        assert steps == 3
        return [6.0, 8.0, 10.0] if isinstance(runner, LlamaRunner) else [10.0, 20.0, 30.0]

    def fake_linears(linears: list[nn.Module], steps: int, dtype, device, clock) -> list[float]:
        return [3.0, 5.0, 7.0]

    monkeypatch.setattr(profile, "decode_step_ms", fake_decode)
    monkeypatch.setattr(profile, "linears_step_ms", fake_linears)
    rows = profile_precision("fp32", steps=3, repeats=3, prompt_tokens=8, model=str(tiny_model_dir), cache_dir=tmp_path)
    # 3 repeats x [10, 20, 30]: median 20, first and last decile 10 and 30; linears' median is 5
    assert rows["HFRunner"] == {"total": 20.0, "p10": 10.0, "p90": 30.0, "linears": 5.0, "rest": 15.0}
    assert rows["LlamaRunner"] == {"total": 8.0, "p10": 6.0, "p90": 10.0, "linears": 5.0, "rest": 3.0}


def test_linear_layers_include_quantized_projections_and_head(tiny_model_dir):
    model, _, _ = load_float_model(str(tiny_model_dir))
    quant.quantize_(model, quant.make_config("int8"))
    assert len(linear_layers(model)) == 2 * 7 + 1
