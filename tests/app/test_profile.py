"""The per-token breakdown command on the tiny model (figures are not asserted, only their consistency)."""

from __future__ import annotations

import pytest

import quant
from app.engine.profile import linear_layers, profile_precision
from quant.checkpoints import load_float_model


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_breakdown_rows(tiny_model_dir, tmp_path, precision):
    rows = profile_precision(
        precision, steps=3, repeats=2, prompt_tokens=8, model=str(tiny_model_dir), cache_dir=tmp_path
    )
    assert set(rows) == {"HFRunner", "LlamaRunner"}
    for row in rows.values():
        assert 0 < row["p10"] <= row["total"] <= row["p90"]
        assert row["linears"] > 0
        assert row["rest"] == pytest.approx(row["total"] - row["linears"])


def test_linear_layers_include_quantized_projections_and_head(tiny_model_dir):
    model, _, _ = load_float_model(str(tiny_model_dir))
    quant.quantize_(model, quant.make_config("int8"))
    assert len(linear_layers(model)) == 2 * 7 + 1
