"""AWQ (Lin et al., 2023) for the int4 storage: activation-aware input-channel scales and weight clipping.

A few input channels carry much larger activations than the rest; their weights matter most.
Multiplying a linear's input channel j by sⱼ and dividing its input by sⱼ leaves the float
function unchanged, but gives the salient channels a finer share of each group's 16 levels.
As the reference (mit-han-lab/llm-awq `auto_scale.py`, `auto_clip.py`):
- s = mean|x|^α, normalised so that max·min = 1, with α on a 20-point grid in [0, 1) chosen to
  minimise the output error of the int4-quantized linears (α = 0 is plain int4);
- the division of the input is folded into whatever produces it: the RMSNorm weight for q/k/v
  (`input_layernorm`) and gate/up (`post_attention_layernorm`), up_proj's rows for down_proj, and
  v_proj's rows for o_proj only when their shapes match (not with grouped-query attention, where
  v_proj has fewer outputs than o_proj has inputs: then o_proj keeps s = 1);
- then each group's range is clipped to ±r·max|w| with r in 1, 0.95, ..., 0.55 chosen per group
  (q and k are not clipped: attention scores are too sensitive), the error being measured on that
  group's output alone.

The output error of a weight error E on calibration inputs X is measured exactly and cheaply as
tr(E H Eᵀ) with H = Σ x xᵀ / n (the reference samples tokens and runs the block instead); for a
clip, on the group's diagonal block of H. The quantizer in the search is int4's own, so the
prepared float model is then stored by plain int4.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.gptq import diagonal_blocks
from quant.layers.int4 import int4_codes, int4_dequantized, int4_group_params
from quant.layerwise import (
    ATTENTION_IN,
    ATTENTION_OUT,
    GROUPS,
    MLP_IN,
    MLP_OUT,
    InputStats,
    LayerGroup,
    single_threaded,
)
from quant.primitives import grouped

SCALE_GRID = 20  # α = 0, 0.05, ..., 0.95
CLIP_GRID = 20  # r = 1 - i / 20 ...
CLIP_STEPS = 10  # ... for i < 10: down to 0.55
NOT_CLIPPED = ("self_attn.q_proj", "self_attn.k_proj")
# Which module produces each group's input, where AWQ's scale is folded.
SCALED_BY = {ATTENTION_IN: "input_layernorm", MLP_IN: "post_attention_layernorm", MLP_OUT: "mlp.up_proj"}
V_TO_O = "self_attn.v_proj"  # the producer of o_proj's input, when the shapes allow


def fake_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`weight` as int4 (min-max, float16 parameters) stores and de-quantizes it."""
    scales, mins = int4_group_params(weight, group_size)
    return int4_dequantized(int4_codes(weight, scales, mins), scales, mins)


def output_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """Σ over tokens and outputs of (E x)², per token: tr(E H Eᵀ) with H = Σ x xᵀ / n."""
    return ((error @ hessian) * error).sum().item()


def search_scales(
    weights: list[torch.Tensor], stats: InputStats, group_size: int
) -> tuple[torch.Tensor, float, float, float]:
    """(s, α, error at α, error at α = 0) of the best grid point for linears sharing one input."""
    hessian = stats.hessian().to(weights[0].device) / 2  # Σ x xᵀ / n
    mean_abs = stats.mean_abs().to(weights[0].device)
    results = []
    for step in range(SCALE_GRID):
        alpha = step / SCALE_GRID
        scales = mean_abs.pow(alpha).clamp_min(1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = sum(output_error(w - fake_int4(w * scales, group_size) / scales, hessian) for w in weights)
        results.append((error, alpha, scales))
    error, alpha, scales = min(results, key=lambda r: r[0])
    return scales, alpha, error, results[0][0]


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group the clip bound [out, n_groups] with the smallest error on that group's output."""
    blocks = diagonal_blocks(hessian, group_size)  # [n_groups, group_size, group_size]
    wg = grouped(weight.float(), group_size)
    absmax = wg.abs().amax(dim=-1, keepdim=True)
    best_error = torch.full(absmax.shape[:-1], float("inf"), device=weight.device)
    best_bound = absmax.clone()
    for step in range(CLIP_STEPS):
        bound = absmax * (1 - step / CLIP_GRID)
        clipped = torch.maximum(torch.minimum(wg, bound), -bound)
        error = wg - grouped(fake_int4(clipped.reshape(weight.shape), group_size), group_size)
        total = torch.einsum("ngi,gij,ngj->ng", error, blocks, error)
        better = total < best_error
        best_error = torch.where(better, total, best_error)
        best_bound = torch.where(better.unsqueeze(-1), bound, best_bound)
    return best_bound.squeeze(-1)


@torch.no_grad()
def fold_scales(layer: nn.Module, producer: str, consumers: tuple[str, ...], scales: torch.Tensor) -> None:
    """Divide `producer`'s output channels by `scales` (an RMSNorm's weight, or a linear's rows and bias)
    and multiply the consumers' input channels by them: the float function is unchanged."""
    source = layer.get_submodule(producer)
    if isinstance(source, nn.Linear):
        source.weight.div_(scales.unsqueeze(1))
        if source.bias is not None:
            source.bias.div_(scales)
    else:
        source.weight.div_(scales)
    for name in consumers:
        layer.get_submodule(name).weight.mul_(scales)


@torch.no_grad()
def clip_weight(linear: nn.Linear, bound: torch.Tensor) -> None:
    group_size = linear.in_features // bound.shape[1]
    wg = grouped(linear.weight.data, group_size)
    limit = bound.unsqueeze(-1).to(wg.dtype)
    wg.copy_(torch.maximum(torch.minimum(wg, limit), -limit))


def v_to_o_allowed(layer: nn.Module) -> bool:
    """o_proj's input channels are v_proj's outputs one to one only without grouped-query attention."""
    return layer.self_attn.v_proj.out_features == layer.self_attn.o_proj.in_features


@torch.no_grad()
def awq_layer(
    layer: nn.Module, prefix: str, groups: dict[str, LayerGroup], group_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Search and apply one decoder layer's scales, then its clips. Returns (state, α per group)."""
    with single_threaded():
        return _awq_layer(layer, prefix, groups, group_size)


def _awq_layer(
    layer: nn.Module, prefix: str, groups: dict[str, LayerGroup], group_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    producers = dict(SCALED_BY)
    if v_to_o_allowed(layer):
        producers[ATTENTION_OUT] = V_TO_O
    input_scales: dict[str, torch.Tensor] = {}
    for group, producer in producers.items():
        weights = [layer.get_submodule(name).weight.float() for name in GROUPS[group]]
        scales, alpha, _, _ = search_scales(weights, groups[group].stats, group_size)
        fold_scales(layer, producer, GROUPS[group], scales)
        state[f"{prefix}.{group}.scales"] = scales
        input_scales[group] = scales
        alphas[group] = alpha
    for group in (ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_OUT):
        hessian = groups[group].stats.hessian().to(layer.mlp.down_proj.weight.device) / 2
        if group in input_scales:  # the input was divided by s: H of the scaled input
            inverse = 1 / input_scales[group]
            hessian = hessian * inverse.unsqueeze(0) * inverse.unsqueeze(1)
        for name in GROUPS[group]:
            if name in NOT_CLIPPED:
                continue
            linear = layer.get_submodule(name)
            bound = search_clip(linear.weight.data, hessian, group_size)
            clip_weight(linear, bound)
            state[f"{prefix}.{name}.clip"] = bound
    return state, alphas


@torch.no_grad()
def apply_awq(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Redo `awq_layer` on every decoder layer from its saved scales and clip bounds."""
    from quant.layerwise import decoder_layers

    prefix, layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        producers = dict(SCALED_BY)
        if v_to_o_allowed(layer):
            producers[ATTENTION_OUT] = V_TO_O
        for group, producer in producers.items():
            fold_scales(layer, producer, GROUPS[group], state[f"{prefix}.{index}.{group}.scales"])
        for names in GROUPS.values():
            for name in names:
                key = f"{prefix}.{index}.{name}.clip"
                if key in state:
                    clip_weight(layer.get_submodule(name), state[key])
