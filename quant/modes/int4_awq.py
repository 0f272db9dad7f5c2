"""int4-awq: the int4 storage of a float model prepared by AWQ (activation-aware scales and clipping)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quant.awq import SCALE_GRID, apply_awq, awq_layer, v_to_o_allowed
from quant.config import CalibratedConfig
from quant.layerwise import LayerGroup, decoder_layers, run_layers
from quant.modes.int4 import Int4WeightOnlyConfig
from quant.registry import register_mode


@register_mode
@dataclass(frozen=True)
class Int4AwqConfig(Int4WeightOnlyConfig, CalibratedConfig):
    name: ClassVar[str] = "int4-awq"
    description: ClassVar[str] = "weight-only int4 (int4 storage), AWQ scales and clipping from calibration text"

    def calibrate(self, model: nn.Module, sequences: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        prefix, layers = decoder_layers(model)
        state: dict[str, torch.Tensor] = {}
        alphas: dict[str, list[float]] = {}
        groups: dict[str, LayerGroup] = {}

        def keep(group: LayerGroup) -> None:
            groups[group.group] = group  # the float model's statistics; scales are applied once the layer ran

        def prepare_layer(index: int, layer: nn.Module) -> None:
            layer_state, layer_alphas = awq_layer(layer, f"{prefix}.{index}", groups, self.group_size)
            state.update(layer_state)
            for group, alpha in layer_alphas.items():
                alphas.setdefault(group, []).append(alpha)
            groups.clear()

        run_layers(model, sequences, keep, prepare_layer)
        details = {
            "scale_grid": SCALE_GRID,
            "mean_alpha": {group: round(sum(a) / len(a), 3) for group, a in alphas.items()},
            "v_to_o": v_to_o_allowed(layers[0]),
        }
        return state, details

    def apply_calibration(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        apply_awq(model, state)
