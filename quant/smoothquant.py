"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

For the linears that read one input X, each input channel j gets a factor
    s_j = max|X_j|^α / max|W_j|^(1-α)      (W_j: column j of every reader, α in [0, 1])
X_j is divided by s_j where X is produced and the readers' columns W[:, j] are multiplied by
it: the float model computes the same function, but the activations' per-channel range is
flattened (α = 1 moves it all into the weights). Where X_j / s_j is made, on a Llama block:
- q/k/v read input_layernorm(h): the norm's weight is divided by s (RMSNorm is x̂ * w);
- gate/up read post_attention_layernorm(h): likewise;
- o_proj reads attention(softmax · V): each channel is a mix of one V channel over positions,
  linear in it, so v_proj's output row is divided instead. With grouped-query attention a V
  channel feeds the same channel of every query head of its group, so those o_proj columns
  share one factor (the group's maxima);
- down_proj reads silu(gate) * up, linear in up's output: up_proj's row j is divided by s_j.
v_proj's and up_proj's weights are quantized per output row, so dividing a row changes no
rounding there. α = 0 means no smoothing at all (the knob's "off").

α trades the activations' range against the weights': the best one differs between layers, so
`best_alpha` picks it per group from calibration rows, as SmoothQuant's autotuners do: the α on
`ALPHA_GRID` whose W8A8 output (weights int8 per output row, inputs int8 with the step the serving
layer will use) is closest to the float output of the group's readers, in summed squared error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quant.primitives import quantize_symmetric

_MIN_FACTOR = 1e-5
ALPHA_GRID = tuple(i / 10 for i in range(10))  # 0, 0.1, ..., 0.9 (α = 1 leaves the weights all the range)
_QMAX = 127


@dataclass(frozen=True)
class SmoothGroup:
    """Linears that read one input, and the module that produces that input (where 1/s folds).

    `fold` is "norm" (an RMSNorm: divide its weight) or "rows" (a linear: divide its output rows
    and bias). `channel_map[j]` is the fold index of input channel j (identity but for GQA's o_proj).
    """

    name: str
    readers: tuple[str, ...]
    source: str
    fold: str
    channel_map: torch.Tensor

    @property
    def folds(self) -> int:
        return int(self.channel_map.max()) + 1


def llama_groups(model: nn.Module) -> list[SmoothGroup]:
    """The four smoothing groups of every block of a Llama-family model ([] for other models)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        return []
    groups: list[SmoothGroup] = []
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names):
            return []
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            return []
        p = f"model.layers.{i}"
        hidden, inter = attn.q_proj.in_features, mlp.down_proj.in_features
        head_dim = attn.o_proj.in_features // heads
        # o_proj input channel (head h, dim d) comes from v row (h // (heads / kv_heads), d)
        channel = torch.arange(attn.o_proj.in_features)
        o_map = (channel // head_dim) // (heads // kv_heads) * head_dim + channel % head_dim
        groups += [
            SmoothGroup(
                f"{p}.qkv",
                (f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"),
                f"{p}.input_layernorm",
                "norm",
                torch.arange(hidden),
            ),
            SmoothGroup(f"{p}.o", (f"{p}.self_attn.o_proj",), f"{p}.self_attn.v_proj", "rows", o_map),
            SmoothGroup(
                f"{p}.gate_up",
                (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"),
                f"{p}.post_attention_layernorm",
                "norm",
                torch.arange(hidden),
            ),
            SmoothGroup(f"{p}.down", (f"{p}.mlp.down_proj",), f"{p}.mlp.up_proj", "rows", torch.arange(inter)),
        ]
    return groups


def _reduce(values: torch.Tensor, channel_map: torch.Tensor, folds: int) -> torch.Tensor:
    """Max of `values` [channels] over the channels that share a fold index -> [folds]."""
    out = torch.zeros(folds, dtype=values.dtype)
    return out.scatter_reduce(0, channel_map, values, reduce="amax", include_self=True)


def smoothing_factors(model: nn.Module, group: SmoothGroup, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [folds] for `group` from its input's per-channel max |x| [channels] (1 where a channel is dead)."""
    weights = [model.get_submodule(name).weight.detach().float().abs().amax(0) for name in group.readers]
    weight_max = _reduce(torch.stack(weights).amax(0), group.channel_map, group.folds)
    act_max = _reduce(act_absmax.float(), group.channel_map, group.folds)
    factors = act_max.pow(alpha) / weight_max.clamp_min(_MIN_FACTOR).pow(1 - alpha)
    dead = (act_max == 0) | (weight_max == 0)
    return torch.where(dead, torch.ones_like(factors), factors.clamp_min(_MIN_FACTOR))


@torch.no_grad()
def apply_smoothing(model: nn.Module, group: SmoothGroup, factors: torch.Tensor) -> None:
    """Divide the source's output channels by `factors` and multiply the readers' columns: same function."""
    source = model.get_submodule(group.source)
    factors = factors.to(source.weight.device)
    if group.fold == "norm":
        source.weight.div_(factors.to(source.weight.dtype))
    else:
        source.weight.div_(factors.to(source.weight.dtype)[:, None])
        if source.bias is not None:
            source.bias.div_(factors.to(source.bias.dtype))
    per_channel = factors[group.channel_map.to(factors.device)]
    for name in group.readers:
        reader = model.get_submodule(name)
        reader.weight.mul_(per_channel.to(reader.weight.dtype)[None, :])


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """The float weight int8 symmetric per output row gives back (Int8WeightOnlyLinear's storage)."""
    q, scale = quantize_symmetric(weight, bits=8)
    return q.float().reshape(weight.shape) * scale.reshape(-1, 1).float()


def fake_quantize_input(x: torch.Tensor, clip: float | None) -> torch.Tensor:
    """x on int8's grid: one fixed step clip / 127 (static, saturating), or None: each row's own absmax."""
    if clip is None:
        step = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / _QMAX
        return torch.round(x / step) * step
    step = clip / _QMAX
    return torch.clamp(torch.round(x / step), -_QMAX, _QMAX) * step


@torch.no_grad()
def output_error(
    model: nn.Module,
    group: SmoothGroup,
    rows: torch.Tensor,
    act_absmax: torch.Tensor,
    alpha: float,
    per_token: bool,
    exact: list[torch.Tensor] | None = None,
) -> float:
    """Σ over the group's readers of ‖x Wᵀ − Q(x / s) Q(W s)ᵀ‖² on calibration `rows` [n, channels], after
    smoothing with α; a static input's step comes from the whole calibration's maxima `act_absmax`.
    `exact`: the readers' float outputs x Wᵀ, when the caller already has them."""
    if alpha > 0:
        per_channel = smoothing_factors(model, group, act_absmax, alpha)[group.channel_map]
    else:
        per_channel = torch.ones(group.channel_map.numel())
    x = rows.float()
    weights = [model.get_submodule(name).weight.detach().float() for name in group.readers]
    exact = exact if exact is not None else [x @ weight.t() for weight in weights]
    clip = None if per_token else max(float((act_absmax.float() / per_channel).max()), 1e-12)
    x_quantized = fake_quantize_input(x / per_channel, clip)
    error = 0.0
    for weight, want in zip(weights, exact, strict=True):
        error += float((want - x_quantized @ fake_quantize_weight(weight * per_channel).t()).pow(2).sum())
    return error


@torch.no_grad()
def best_alpha(
    model: nn.Module, group: SmoothGroup, rows: torch.Tensor, act_absmax: torch.Tensor, per_token: bool
) -> float:
    """The α of `ALPHA_GRID` with the least `output_error` for `group` (weights not yet smoothed)."""
    exact = [rows.float() @ model.get_submodule(name).weight.detach().float().t() for name in group.readers]
    errors = [output_error(model, group, rows, act_absmax, alpha, per_token, exact) for alpha in ALPHA_GRID]
    return ALPHA_GRID[min(range(len(errors)), key=errors.__getitem__)]
