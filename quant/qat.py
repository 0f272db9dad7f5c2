"""Quantization-aware training support: fake quantization on a mode's exact grid.

`prepare_qat(model, config)` makes every linear the mode would quantize compute with its
weight rounded to that mode's grid (a parametrization), with straight-through gradients:
the backward pass treats the rounding as the identity, so the float ("latent") weights
learn. `finish_qat(model)` removes the parametrizations and leaves the rounded weights in
place. Those float weights sit on the grid, and the mode's own round-to-nearest rebuilds
the same grid from them (every group keeps weights at its lowest and highest code), so a
checkpoint saved from them serves exactly the trained quantized weights
(`grid_mismatches` checks it).

Supported: `int4` (min-max per group, float16 scale and minimum, as `Int4WeightOnlyLinear`).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.utils import parametrize

from quant.config import QuantConfig
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.layers.int8_grouped import Int8G32Linear
from quant.primitives import _affine_step as affine_step  # the int4 step, shared so the grid is identical
from quant.primitives import affine_codes, grouped

QAT_MODES = ("int4",)  # modes whose grid is reproduced by round-to-nearest from on-grid weights


class QatModeError(ValueError):
    """The mode has no fake quantizer (its grid is data-dependent beyond min-max, or not weight-only)."""


def int4_on_grid(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`weight` rounded to the `int4` mode's grid, in float32: the values `Int4WeightOnlyLinear.from_linear`
    stores (min-max per group, scale and minimum rounded to float16 first, nearest code 0..15)."""
    return _int4_on_grid(weight, group_size)[0]


def _int4_on_grid(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(on-grid weight, mask of each group's minimum and maximum: the weights that set its grid)."""
    w = weight.detach().float()
    # quantize_affine's min-max parameters, without its codes (they are taken on the float16 grid below)
    lo, hi = torch.aminmax(grouped(w, group_size), dim=-1, keepdim=True)
    extremes = ((grouped(w, group_size) == lo) | (grouped(w, group_size) == hi)).reshape(w.shape)
    scale = affine_step(lo, hi, 4)
    zero = -lo / scale
    scales = scale.clamp_min(2.0**-24).to(torch.float16).float()
    mins = (-zero * scale).to(torch.float16).float()
    codes = affine_codes(grouped(w, group_size), scales, mins, bits=4).float()
    return (codes * scales + mins).reshape(w.shape), extremes


class _StraightThrough(torch.autograd.Function):
    """Forward: the on-grid weight, bit for bit (`w + (q - w).detach()` is off by rounding). Backward: the
    identity, except for each group's minimum and maximum, which get no gradient: they set the group's
    grid, and moving one would shift every code of its group at once, which the straight-through
    estimate does not foresee. The grid stays put; the weights inside it learn their codes."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, group_size: int) -> torch.Tensor:  # type: ignore[override]
        on_grid, extremes = _int4_on_grid(weight, group_size)
        ctx.save_for_backward(extremes)
        return on_grid.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (extremes,) = ctx.saved_tensors
        return grad.masked_fill(extremes, 0.0), None


class Int4FakeQuantize(nn.Module):
    """Parametrization: the forward sees the int4 weight; the gradient reaches the latent weight unchanged."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(weight, self.group_size)


def check_qat_mode(config: QuantConfig) -> None:
    if config.name not in QAT_MODES:
        raise QatModeError(
            f"QAT supports {', '.join(QAT_MODES)}; {config.name!r} has no fake quantizer here "
            "(its served grid is not rebuilt exactly from on-grid float weights)"
        )


def qat_linears(model: nn.Module, config: QuantConfig) -> dict[str, nn.Linear]:
    """The linears the mode quantizes with its own grid: not the output head (tied or not, it stays out
    of training), not `skip_modules`, and only shapes the mode takes."""
    check_qat_mode(config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in config.skip_modules):
            continue
        if Int4WeightOnlyLinear.supports(module.in_features, config.group_size):  # type: ignore[attr-defined]
            selected[name] = module
    return selected


def round_tied_head(model: nn.Module, config: QuantConfig) -> bool:
    """Put a tied output head on the grid serving gives it (int8, a scale per 32 inputs, when
    `quantize_lm_head` is auto on CPU), so that the student trains against the head it will have."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
    if not (tied and config.quantize_lm_head == "auto" and Int8G32Linear.supports(head.in_features)):
        return False
    with torch.no_grad():
        head.weight.copy_(Int8G32Linear.from_linear(head).dequantize_weight().to(head.weight.dtype))
    return True


def prepare_qat(model: nn.Module, config: QuantConfig) -> list[str]:
    """Fake-quantize the mode's linears in place; returns their names."""
    linears = qat_linears(model, config)
    for module in linears.values():
        parametrize.register_parametrization(module, "weight", Int4FakeQuantize(config.group_size))  # type: ignore[attr-defined]
    return list(linears)


def finish_qat(model: nn.Module) -> None:
    """Replace each fake-quantized weight by its on-grid value (a plain parameter again)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def grid_mismatches(model: nn.Module, config: QuantConfig) -> dict[str, int]:
    """Per linear, how many weights the mode's round-to-nearest would change (all zero after `finish_qat`)."""
    mismatches = {}
    for name, linear in qat_linears(model, config).items():
        weight = linear.weight.detach().float()
        # int4_on_grid is what the layer stores, bit for bit (tests/quant/test_qat.py), and several
        # times cheaper than building the layers
        mismatches[name] = int((int4_on_grid(weight, config.group_size) != weight).sum())  # type: ignore[attr-defined]
    return mismatches
