"""QAT's fake quantizer: the int4 mode's exact grid, straight-through gradients, and on-grid weights
that the mode's round-to-nearest serves unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import quant
from quant.checkpoints import load_float_model
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.qat import (
    QatModeError,
    finish_qat,
    grid_mismatches,
    int4_on_grid,
    prepare_qat,
    qat_linears,
    round_tied_head,
)


def _linear(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(out_features, 1) * 4)  # rows of different ranges
        linear.weight[0, 3] = 5.0  # an outlier stretches one group's range
    return linear


@pytest.mark.parametrize("group_size", [32, 64])
def test_on_grid_weight_is_exactly_what_the_int4_layer_stores(group_size: int) -> None:
    linear = _linear(48, 256)
    stored = Int4WeightOnlyLinear.from_linear(linear, group_size).dequantize_weight()
    assert torch.equal(int4_on_grid(linear.weight, group_size), stored)


@pytest.mark.parametrize("group_size", [32, 64])
def test_round_to_nearest_of_on_grid_weights_rebuilds_them(group_size: int) -> None:
    # what serving a QAT checkpoint does: the mode's RTN on weights that are already on the grid
    for seed in range(5):
        on_grid = int4_on_grid(_linear(64, 512, seed).weight, group_size)
        layer = nn.Linear(512, 64, bias=False)
        layer.weight.data = on_grid
        assert torch.equal(Int4WeightOnlyLinear.from_linear(layer, group_size).dequantize_weight(), on_grid)


def test_fake_quantized_linear_computes_with_the_grid_and_passes_gradients_straight_through() -> None:
    model = nn.Sequential(_linear(32, 128))
    latent = model[0].weight.detach().clone()
    names = prepare_qat(model, quant.make_config("int4", quant.QuantOptions(group_size=64)))
    assert names == ["0"]
    x = torch.randn(5, 128)
    y = model(x)
    assert torch.equal(y, x @ int4_on_grid(latent, 64).T)
    y.pow(2).sum().backward()
    grad_latent = model[0].parametrizations.weight.original.grad
    # straight through: the latent weight gets the gradient of the on-grid weight as is, except each
    # group's minimum and maximum (they hold the grid in place)
    expected = (2 * y).T @ x
    groups = latent.reshape(32, -1, 64)
    extremes = (groups == groups.amin(-1, keepdim=True)) | (groups == groups.amax(-1, keepdim=True))
    extremes = extremes.reshape(latent.shape)
    assert extremes.sum() == 2 * 32 * 2  # two per group here (no ties)
    torch.testing.assert_close(grad_latent[~extremes], expected[~extremes])
    assert torch.all(grad_latent[extremes] == 0)
    finish_qat(model)
    assert type(model[0].weight) is nn.Parameter and torch.equal(model[0].weight, int4_on_grid(latent, 64))


def test_finished_weights_stay_on_the_grid_after_updates(tiny_model_dir: Path) -> None:
    model, _, _ = load_float_model(str(tiny_model_dir))
    config = quant.make_config("int4", quant.QuantOptions(group_size=32))
    assert any(grid_mismatches(model, config).values())  # a random float model is off the grid
    prepare_qat(model, config)
    with torch.no_grad():  # what optimizer steps do: move the latent weights anywhere
        for name, parameter in model.named_parameters():
            if name.endswith("original"):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    finish_qat(model)
    assert not any(grid_mismatches(model, config).values())


def test_qat_covers_the_linears_the_mode_quantizes_except_the_head(tiny_model_dir: Path) -> None:
    model, _, _ = load_float_model(str(tiny_model_dir))
    config = quant.make_config("int4", quant.QuantOptions(group_size=64, skip_modules=("down_proj",)))
    names = list(qat_linears(model, config))
    assert len(names) == 2 * 6  # q, k, v, o, gate, up in each of the 2 layers; down_proj skipped
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)


def test_tied_head_is_put_on_the_int8_g32_grid_serving_uses(tiny_model_dir: Path) -> None:
    model, _, _ = load_float_model(str(tiny_model_dir))
    config = quant.make_config("int4", quant.QuantOptions())
    before = model.get_input_embeddings().weight.detach().clone()
    assert round_tied_head(model, config)
    after = model.get_input_embeddings().weight
    assert not torch.equal(before, after) and (before - after).abs().max() < before.abs().max() / 100
    assert model.lm_head.weight.data_ptr() == after.data_ptr()  # still tied
    assert not round_tied_head(model, quant.make_config("int4", quant.QuantOptions(quantize_lm_head="false")))


@pytest.mark.parametrize("mode", ["int8", "int4-hqq", "nf4", "fp32"])
def test_modes_without_a_fake_quantizer_are_refused(mode: str) -> None:
    with pytest.raises(QatModeError, match="QAT supports int4"):
        qat_linears(nn.Sequential(nn.Linear(64, 64)), quant.make_config(mode, quant.QuantOptions()))
