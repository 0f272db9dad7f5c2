"""AWQ (`quant.awq`): scales that protect salient input channels, clipping, folding that keeps the function."""

from __future__ import annotations

import pytest
import torch

from quant.awq import awq_layer, fake_int4, fold_scales, output_error, search_clip, search_scales
from quant.layerwise import InputStats, first_layer_inputs, run_layer
from tests.support.tiny_calibration import tiny_llama_and_sequences

GROUP = 32


@pytest.fixture
def tiny_llama(tiny_model_dir):
    return tiny_llama_and_sequences(tiny_model_dir)


def salient_layer(seed: int, in_features: int = 128, out_features: int = 64, tokens: int = 2048):
    """Inputs where 4 channels are 20x larger than the rest (the activation outliers AWQ targets)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=generator)
    x[:, [3, 40, 77, 100]] *= 20.0
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    stats = InputStats(in_features)
    stats.add(x)
    return weight, x, stats


def relative_output_error(weight: torch.Tensor, reference: torch.Tensor, x: torch.Tensor) -> float:
    return ((x @ (weight - reference).T).norm() / (x @ reference.T).norm()).item()


def test_scales_cut_the_output_error_of_salient_channels() -> None:
    for seed in (0, 1):
        weight, x, stats = salient_layer(seed)
        scales, alpha, error, plain_error = search_scales([weight], stats, GROUP)
        assert alpha > 0 and error < 0.7 * plain_error
        # the metric is the real output error on the calibration tokens
        awq = fake_int4(weight * scales, GROUP) / scales
        rtn = fake_int4(weight, GROUP)
        assert relative_output_error(awq, weight, x) < 0.85 * relative_output_error(rtn, weight, x)
        measured = (x @ (weight - awq).T).pow(2).sum().item() / x.shape[0]
        assert output_error(weight - awq, stats.hessian() / 2) / measured - 1 == pytest.approx(0, abs=1e-3)


def test_clipping_never_raises_a_groups_error_and_clips_an_outlier() -> None:
    weight, x, stats = salient_layer(0)
    weight[7, 50] = 0.3  # one outlier stretches its group's grid
    hessian = stats.hessian() / 2
    bound = search_clip(weight, hessian, GROUP)
    absmax = weight.abs().reshape(64, -1, GROUP).amax(-1)
    assert (bound <= absmax).all() and bound[7, 50 // GROUP] < absmax[7, 50 // GROUP]
    clipped = torch.maximum(torch.minimum(weight.reshape(64, -1, GROUP), bound[..., None]), -bound[..., None])
    clipped_error = relative_output_error(fake_int4(clipped.reshape(weight.shape), GROUP), weight, x)
    assert clipped_error <= relative_output_error(fake_int4(weight, GROUP), weight, x)


def test_folding_into_the_norm_and_up_proj_keeps_the_float_layer(tiny_llama) -> None:
    model, sequences = tiny_llama
    layer = model.model.layers[0]
    inputs = first_layer_inputs(model, sequences, 2)
    x, kwargs = inputs[0]
    with torch.no_grad():
        before = layer(x, **kwargs)
        generator = torch.Generator().manual_seed(0)
        hidden, intermediate = layer.mlp.gate_proj.in_features, layer.mlp.up_proj.out_features
        fold_scales(
            layer,
            "input_layernorm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            torch.rand(hidden, generator=generator) + 0.5,
        )
        fold_scales(layer, "mlp.up_proj", ("mlp.down_proj",), torch.rand(intermediate, generator=generator) + 0.5)
        after = layer(x, **kwargs)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_awq_layer_state_redoes_the_same_weights(tiny_llama) -> None:
    from quant.awq import apply_awq

    model, sequences = tiny_llama
    original = {k: v.clone() for k, v in model.state_dict().items()}
    groups = {}
    inputs = first_layer_inputs(model, sequences, 2)
    run_layer(model.model.layers[0], 0, inputs, lambda g: groups.__setitem__(g.group, g))
    state, alphas = awq_layer(model.model.layers[0], "model.layers.0", groups, GROUP)
    assert set(alphas) == {"attention_in", "mlp_in", "mlp_out"}  # GQA: no v -> o scale
    prepared = {k: v.clone() for k, v in model.model.layers[0].state_dict().items()}
    model.load_state_dict(original)
    # every layer's entries (only layer 0's computed here; layer 1 with neutral ones)
    hidden = model.config.hidden_size
    for group, width in (("attention_in", hidden), ("mlp_in", hidden), ("mlp_out", model.config.intermediate_size)):
        state.setdefault(f"model.layers.1.{group}.scales", torch.ones(width))
    apply_awq(model, state)
    for key, value in model.model.layers[0].state_dict().items():
        assert torch.equal(value, prepared[key]), key
