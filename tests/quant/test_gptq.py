"""GPTQ on int4's grid (`quant.gptq`): lower output error than round-to-nearest, exactly int4's storage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant.gptq import (
    Int4Solution,
    diagonal_blocks,
    gptq_int4,
    group_output_error,
    refit_group_params,
    search_group_params,
)
from quant.layers.int4 import Int4WeightOnlyLinear, int4_codes, int4_dequantized, int4_group_params
from quant.primitives import grouped, unpack_int4

GROUP = 32


def correlated_layer(seed: int, in_features: int = 128, out_features: int = 48, tokens: int = 2048):
    """A linear and inputs whose features are strongly correlated (a low-rank mix plus noise), with
    a few large channels, as a transformer's activations are."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, in_features, generator=generator)
    x = torch.randn(tokens, 16, generator=generator) @ mix + 0.1 * torch.randn(tokens, in_features, generator=generator)
    x[:, :4] *= 8.0
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
    return linear, x, 2 * x.T @ x / tokens


def output_error(weight: torch.Tensor, reference: torch.Tensor, x: torch.Tensor) -> float:
    return ((x @ (weight - reference).T).norm() / (x @ reference.T).norm()).item()


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_output_error_is_well_below_round_to_nearest(seed: int, act_order: bool) -> None:
    linear, x, hessian = correlated_layer(seed)
    rtn = Int4WeightOnlyLinear.from_linear(linear, GROUP).dequantize_weight()
    gptq = gptq_int4(linear.weight, hessian, GROUP, act_order=act_order).dequantized()
    rtn_error, gptq_error = output_error(rtn, linear.weight, x), output_error(gptq, linear.weight, x)
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)


def test_the_served_layer_reproduces_gptqs_weights_exactly() -> None:
    linear, x, hessian = correlated_layer(0)
    solution = gptq_int4(linear.weight, hessian, GROUP)
    layer = Int4WeightOnlyLinear.from_storage(linear, solution.codes, solution.scales, solution.mins)
    assert torch.equal(unpack_int4(layer.packed), solution.codes)
    assert torch.equal(layer.dequantize_weight(), solution.dequantized())
    with torch.no_grad():  # the kernel applies that weight (from 128 rows: de-quantized, float GEMM)
        torch.testing.assert_close(layer(x[:128]), x[:128] @ solution.dequantized().T, rtol=1e-4, atol=1e-5)


def test_without_correlations_gptq_is_int4_itself() -> None:
    """With H = I no error is worth spreading: GPTQ must then pick int4's own codes and parameters,
    which shows that its quantizer is int4's grid, float16 parameters included."""
    linear, _, _ = correlated_layer(0)
    rtn = Int4WeightOnlyLinear.from_linear(linear, GROUP)
    solution = gptq_int4(linear.weight, torch.eye(linear.in_features), GROUP, act_order=False)
    assert torch.equal(solution.codes, unpack_int4(rtn.packed))
    assert torch.equal(solution.scales, rtn.scales) and torch.equal(solution.mins, rtn.mins)


def test_act_order_keeps_static_groups_contiguous_and_dead_inputs_are_zeroed() -> None:
    linear, _, hessian = correlated_layer(1)
    hessian[5, :] = 0
    hessian[:, 5] = 0  # input 5 never fires
    solution = gptq_int4(linear.weight, hessian, GROUP, act_order=True)
    # static groups: every group's parameters are int4's min-max of the (dead-zeroed) original weights
    weight = linear.weight.detach().clone()
    weight[:, 5] = 0
    rtn_of_weight = Int4WeightOnlyLinear.from_linear(_linear_of(weight), GROUP)
    assert torch.equal(solution.scales, rtn_of_weight.scales) and torch.equal(solution.mins, rtn_of_weight.mins)
    assert (solution.codes <= 15).all()


def _linear_of(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def test_a_singular_hessian_is_dampened_further() -> None:
    linear, _, _ = correlated_layer(0)
    v = torch.randn(128, generator=torch.Generator().manual_seed(0))
    mean_diagonal = v.pow(2).mean()
    # eigenvalues -2% of the mean diagonal: 1% dampening leaves H indefinite, 10% does not
    hessian = torch.outer(v, v) - 0.02 * mean_diagonal * torch.eye(128)
    solution = gptq_int4(linear.weight, hessian, GROUP, act_order=False)
    assert solution.dampening == pytest.approx(0.1)


def _hessian_error(weight: torch.Tensor, reference: torch.Tensor, hessian: torch.Tensor) -> float:
    error = weight - reference
    return ((error @ hessian) * error).sum().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_refitting_the_group_parameters_lowers_the_output_error_for_the_same_codes(seed: int) -> None:
    linear, _, hessian = correlated_layer(seed)
    plain = gptq_int4(linear.weight, hessian, GROUP, act_order=False)
    scales, mins = refit_group_params(linear.weight.detach(), hessian, plain.codes, GROUP)
    refitted = Int4Solution(plain.codes, scales, mins, plain.dampening)
    before = _hessian_error(plain.dequantized(), linear.weight.detach(), hessian)
    after = _hessian_error(refitted.dequantized(), linear.weight.detach(), hessian)
    assert after < 0.9 * before, (after, before)
    assert scales.dtype == mins.dtype == torch.float16 and torch.isfinite(scales.float()).all()


def test_the_refit_is_exact_least_squares() -> None:
    """On codes of a weight that lies exactly on an int4 grid, the refit recovers that grid's parameters."""
    linear, _, hessian = correlated_layer(2)
    rtn = Int4WeightOnlyLinear.from_linear(linear, GROUP)
    codes = unpack_int4(rtn.packed)
    exact = rtn.dequantize_weight()
    scales, mins = refit_group_params(exact, hessian, codes, GROUP)
    torch.testing.assert_close(scales, rtn.scales.view_as(scales), rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(mins, rtn.mins.view_as(mins), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_with_refits_beats_plain_gptq(seed: int) -> None:
    linear, x, hessian = correlated_layer(seed)
    plain = gptq_int4(linear.weight, hessian, GROUP, refit_rounds=0).dequantized()
    refitted = gptq_int4(linear.weight, hessian, GROUP, refit_rounds=2).dequantized()
    plain_error, refitted_error = output_error(plain, linear.weight, x), output_error(refitted, linear.weight, x)
    assert refitted_error < 0.9 * plain_error, (refitted_error, plain_error)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_group_parameter_search_has_less_output_error_than_min_max(seed: int) -> None:
    linear, _, hessian = correlated_layer(seed)
    weight = linear.weight.detach()
    blocks = diagonal_blocks(hessian, GROUP)

    def per_group_error(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
        scales, mins = scales.view(*scales.shape[:2], 1), mins.view(*mins.shape[:2], 1)
        quantized = int4_dequantized(int4_codes(weight, scales, mins), scales, mins)
        return group_output_error(grouped(quantized - weight, GROUP), blocks)

    min_max = per_group_error(*int4_group_params(weight, GROUP))
    searched = per_group_error(*search_group_params(weight, hessian, GROUP))
    assert (searched <= min_max * (1 + 1e-5)).all()  # min-max is one of the candidates
    assert searched.sum() < 0.9 * min_max.sum(), (searched.sum(), min_max.sum())


def test_group_output_error_is_the_output_error_of_that_group_alone() -> None:
    linear, x, hessian = correlated_layer(0)
    error = torch.zeros_like(linear.weight)
    error[:, GROUP : 2 * GROUP] = torch.randn(linear.out_features, GROUP, generator=torch.Generator().manual_seed(3))
    per_group = group_output_error(grouped(error, GROUP), diagonal_blocks(hessian, GROUP))
    direct = (x @ error.T).pow(2).sum(0) * 2 / x.shape[0]  # H = 2/n Σ x xᵀ
    torch.testing.assert_close(per_group[:, 1], direct, rtol=1e-4, atol=1e-6)
    assert (per_group[:, [0, 2, 3]] == 0).all()


def test_searched_parameters_are_gptqs_static_groups() -> None:
    linear, _, hessian = correlated_layer(1)
    scales, mins = search_group_params(linear.weight.detach(), hessian, GROUP)
    solution = gptq_int4(linear.weight, hessian, GROUP, search_params=True)
    assert torch.equal(solution.scales, scales) and torch.equal(solution.mins, mins)
