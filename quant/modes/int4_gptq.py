"""int4-gptq: the int4 storage, with codes and group parameters chosen by GPTQ on calibration text."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quant.config import CalibratedConfig
from quant.gptq import BLOCK_SIZE, DAMPENING, gptq_int4
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.layerwise import LayerGroup, run_layers
from quant.modes.int4 import Int4WeightOnlyConfig
from quant.primitives import pack_int4, unpack_int4
from quant.registry import register_mode

log = logging.getLogger(__name__)

_SOLUTION = "gptq_int4"  # attribute of a calibrated nn.Linear: (packed codes, scales, mins)


def _attach(linear: nn.Linear, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
    # A plain attribute, read by quantize_linear when the layer is replaced (then dropped with it).
    object.__setattr__(linear, _SOLUTION, (packed, scales, mins))


@register_mode
@dataclass(frozen=True)
class Int4GptqConfig(Int4WeightOnlyConfig, CalibratedConfig):
    name: ClassVar[str] = "int4-gptq"
    description: ClassVar[str] = "weight-only int4 (int4 storage), codes chosen by GPTQ on calibration text"
    # Columns by decreasing Hessian diagonal, group parameters fixed first (static groups):
    # measured better than natural order on the default model (README, Calibrated modes).
    act_order: ClassVar[bool] = True
    # Each group's scale and min searched first, scored on H (static groups start from them):
    # measured far better than min-max on the default model (README, Calibrated modes).
    search_params: ClassVar[bool] = True
    # Then one least-squares refit of the group parameters given GPTQ's codes (a second round, GPTQ
    # re-run on the refitted grid, measured barely better for another column loop).
    refit_rounds: ClassVar[int] = 1
    # 2: searched and refitted group parameters; results of version 1 (min-max groups) are not read.
    algorithm_version: ClassVar[int] = 2

    def calibrate(self, model: nn.Module, sequences: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state: dict[str, torch.Tensor] = {}
        originals: dict[str, torch.Tensor] = {}
        dampenings: list[float] = []

        def quantize_group(group: LayerGroup) -> None:
            linears = {
                n: m for n, m in group.linears.items() if Int4WeightOnlyLinear.supports(m.in_features, self.group_size)
            }
            if not linears:
                return
            # linears sharing an input share H: one GPTQ run over their stacked rows
            weight = torch.cat([m.weight.detach().float() for m in linears.values()])
            solution = gptq_int4(
                weight,
                group.stats.hessian(),
                self.group_size,
                act_order=self.act_order,
                search_params=self.search_params,
                refit_rounds=self.refit_rounds,
            )
            dampenings.append(solution.dampening)
            quantized = solution.dequantized()
            row = 0
            for name, linear in linears.items():
                rows = slice(row, row + linear.out_features)
                row += linear.out_features
                state[f"{name}.packed"] = pack_int4(solution.codes[rows])
                state[f"{name}.scales"] = solution.scales[rows].clone()  # own storage: bytes count per layer
                state[f"{name}.mins"] = solution.mins[rows].clone()
                # later stages and layers see this linear's quantized output (true-sequential)
                originals[name] = linear.weight.detach().clone()
                linear.weight.data.copy_(quantized[rows])

        def restore_layer(index: int, layer: nn.Module) -> None:
            # The float model keeps its own weights (error reports compare against them); the
            # quantized ones are attached below and served by quantize_linear.
            for name in list(originals):
                model.get_submodule(name).weight.data.copy_(originals.pop(name))

        run_layers(model, sequences, quantize_group, restore_layer)
        self.apply_calibration(model, state)
        details = {
            "act_order": self.act_order,
            "search_params": self.search_params,
            "refit_rounds": self.refit_rounds,
            "block_size": BLOCK_SIZE,
            "dampening": DAMPENING,
            "max_dampening": max(dampenings, default=DAMPENING),
            "layers": len(state) // 3,
        }
        return state, details

    def apply_calibration(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for key in state:
            if key.endswith(".packed"):
                name = key.removesuffix(".packed")
                _attach(model.get_submodule(name), state[key], state[f"{name}.scales"], state[f"{name}.mins"])

    def quantize_linear(self, linear: nn.Linear) -> nn.Module | None:
        solution = getattr(linear, _SOLUTION, None)
        if solution is None or not Int4WeightOnlyLinear.supports(linear.in_features, self.group_size):
            # outside the decoder layers (e.g. an untied head with QS_QUANTIZE_LM_HEAD=true): plain int4
            log.info(
                "%s: a %s without GPTQ calibration is quantized by int4's round-to-nearest",
                self.name,
                type(linear).__name__,
            )
            return super().quantize_linear(linear)
        packed, scales, mins = solution
        return Int4WeightOnlyLinear.from_storage(linear, unpack_int4(packed), scales, mins)
