"""int8-static: W8A8 with calibrated per-tensor activation scales, after SmoothQuant's migration.

Calibration runs the float model over the calibration sequences:
1. per-channel max |x| of every linear's input, and a sample of its rows -> SmoothQuant factors
   (`quant.smoothquant`), α fixed or (`auto`) chosen per layer group on the sampled rows, folded
   into the norms, v_proj and up_proj (skipped when `smoothquant_alpha` is 0);
2. the observer's clipping value c per input (`quant.observers`): with `minmax` the largest smoothed
   |x|, known from pass 1 (max_j max|x_j| / s_j); otherwise from a second pass, histograms of the
   smoothed inputs. The input's int8 step is c / 127, fixed from then on.
Each linear is then int8 per output channel, and at run time its input is quantized with that
fixed step: no per-token absmax. Linears that read one input (q/k/v, gate/up) share one step.
Exception, `dynamic_activation_modules` (default down_proj): this model's massive activations
(a few tokens ~1000x the rest) reach down_proj's input, where no fixed step both holds them and
resolves the rest, so those inputs keep int8-dynamic's per-token step (smoothed all the same).
A linear calibration did not see (e.g. a GPT-2 Conv1D) stays float and is counted as a fallback.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quant.config import CalibratedConfig, knob_default, module_matches
from quant.layers.int8 import Int8DynamicLinear
from quant.layers.int8_static import Int8StaticLinear
from quant.observers import HistogramObserver
from quant.registry import register_mode
from quant.smoothquant import SmoothGroup, apply_smoothing, best_alpha, llama_groups, smoothing_factors

log = logging.getLogger(__name__)

_BATCH_SEQUENCES = 4  # calibration sequences per forward (memory: activations of 4 x 512 tokens)
_SCALE_ATTRIBUTE = "static_act_scale"  # set on each calibrated nn.Linear, read by quantize_linear
_DYNAMIC_ATTRIBUTE = "per_token_activations"  # set on the linears served with per-token steps
_SAMPLE_ROWS = 512  # calibration rows kept per input for the α search (spread over every batch)


def _input_readers(model: nn.Module, groups: list[SmoothGroup]) -> dict[str, list[str]]:
    """Observed input -> the linears that read it: a group's first reader stands for the group;
    every other nn.Linear (but the tied head, which quantize_ handles itself) is its own."""
    readers = {group.readers[0]: list(group.readers) for group in groups}
    grouped = {name for group in groups for name in group.readers}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in grouped:
            readers[name] = [name]
    return readers


def _run(model: nn.Module, sequences: torch.Tensor, observe: dict[str, Any]) -> None:
    """Forward the sequences with `observe[name](x)` called on the input of each named linear."""

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            observe[name](args[0])

        return hook

    # A Llama-family model runs its base only: the head's [tokens, vocab] logits are not needed,
    # its input is the base's output (observed directly when the head is one of the linears).
    base, head = getattr(model, "model", None), model.get_output_embeddings()
    head_name = next((name for name, module in model.named_modules() if module is head), None)
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(hook_for(name))
        for name in observe
        if base is None or name != head_name
    ]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for batch in sequences.split(_BATCH_SEQUENCES):
                if base is None:
                    model(input_ids=batch.to(device), use_cache=False)
                    continue
                hidden = base(input_ids=batch.to(device), use_cache=False).last_hidden_state
                if head_name in observe:
                    observe[head_name](hidden)
    finally:
        for hook in hooks:
            hook.remove()


@register_mode
@dataclass(frozen=True)
class Int8StaticConfig(CalibratedConfig):
    name: ClassVar[str] = "int8-static"
    description: ClassVar[str] = (
        "W8A8: int8 per-channel weights, int8 activations with calibrated per-tensor scales (SmoothQuant first; "
        "down_proj's input per token by default)"
    )
    bits: ClassVar[float] = 8
    quantizes_activations: ClassVar[bool] = True
    # 2: α per layer group (auto), dynamic inputs, minmax clip from pass 1
    algorithm_version: ClassVar[int] = 2

    activation_observer: str = knob_default("activation_observer")
    smoothquant_alpha: str = knob_default("smoothquant_alpha")
    dynamic_activation_modules: tuple[str, ...] = knob_default("dynamic_activation_modules")

    def calibrate(self, model: nn.Module, sequences: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        groups = llama_groups(model)  # linears that share an input share one step, smoothed or not
        readers = _input_readers(model, groups)
        # an input is quantized per token when any of its readers matches (its readers share one quantizer)
        dynamic = {
            name
            for name, names in readers.items()
            if any(module_matches(r, self.dynamic_activation_modules) for r in names)
        }
        auto = self.smoothquant_alpha == "auto"
        if not auto and float(self.smoothquant_alpha) == 0:  # the knob's "off"
            groups = []
        # pass 1: per-channel max |x| of every observed input (SmoothQuant's statistic, and the range),
        # and for the α search a few rows of every batch
        channel_max: dict[str, torch.Tensor] = {}
        rows: dict[str, list[torch.Tensor]] = {}
        batches = math.ceil(sequences.shape[0] / _BATCH_SEQUENCES)
        rows_per_batch = math.ceil(_SAMPLE_ROWS / batches) if auto and groups else 0
        generator = torch.Generator().manual_seed(0)

        def track(name: str) -> Any:
            def observe(x: torch.Tensor) -> None:
                flat = x.detach().float().reshape(-1, x.shape[-1]).cpu()
                current = flat.abs().amax(0)
                channel_max[name] = torch.maximum(channel_max[name], current) if name in channel_max else current
                if rows_per_batch:
                    picked = torch.randperm(flat.shape[0], generator=generator)[:rows_per_batch]
                    rows.setdefault(name, []).append(flat[picked].clone())

            return observe

        _run(model, sequences, {name: track(name) for name in readers})
        state: dict[str, torch.Tensor] = {}
        alphas: dict[str, float] = {}
        top = {name: float(m.max()) for name, m in channel_max.items()}
        for group in groups:  # every factor from the unsmoothed weights, then folded
            name = group.readers[0]
            if auto:
                alphas[group.name] = best_alpha(model, group, torch.cat(rows[name]), channel_max[name], name in dynamic)
            else:
                alphas[group.name] = float(self.smoothquant_alpha)
            state[f"smooth.{group.name}"] = smoothing_factors(model, group, channel_max[name], alphas[group.name])
        rows.clear()
        for group in groups:
            factors = state[f"smooth.{group.name}"]
            apply_smoothing(model, group, factors)
            # the smoothed input's range: channel j now peaks at max|x_j| / s_j
            top[group.readers[0]] = float((channel_max[group.readers[0]] / factors[group.channel_map]).max())
        static = [name for name in readers if name not in dynamic]
        clips = self._clips(model, sequences, static, top)
        for name in readers:
            for reader in readers[name]:
                if name in dynamic:
                    state[f"dynamic.{reader}"] = torch.ones(1)
                else:
                    state[f"act_scale.{reader}"] = torch.tensor([clips[name] / 127], dtype=torch.float32)
        self._set_scales(model, state)
        details = {
            "observer": self.activation_observer,
            "smoothquant_alpha": self.smoothquant_alpha,
            "smoothed_groups": len(groups),
            "alpha_by_kind": _alphas_by_kind(alphas),
            "observed_inputs": len(readers),
            "dynamic_layers": sorted(reader for name in dynamic for reader in readers[name]),
            "mean_clip_over_max": sum(clips[n] / max(top[n], 1e-12) for n in static) / max(len(static), 1),
        }
        return state, details

    def _clips(
        self, model: nn.Module, sequences: torch.Tensor, inputs: list[str], top: dict[str, float]
    ) -> dict[str, float]:
        """The observer's clipping value of each static input; minmax needs no second pass."""
        if self.activation_observer == "minmax":
            return {name: max(top[name], 1e-12) for name in inputs}
        observers = {name: HistogramObserver(top[name] * 1.001) for name in inputs}
        _run(model, sequences, {name: observers[name].observe for name in inputs})
        return {name: observer.clip(self.activation_observer) for name, observer in observers.items()}

    def apply_calibration(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for group in llama_groups(model):  # calibrate's order: a v/up weight is divided and multiplied alike
            factors = state.get(f"smooth.{group.name}")
            if factors is not None:
                apply_smoothing(model, group, factors)
        self._set_scales(model, state)

    @staticmethod
    def _set_scales(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for key, scale in state.items():
            if key.startswith("act_scale."):
                setattr(model.get_submodule(key.removeprefix("act_scale.")), _SCALE_ATTRIBUTE, float(scale))
            elif key.startswith("dynamic."):
                setattr(model.get_submodule(key.removeprefix("dynamic.")), _DYNAMIC_ATTRIBUTE, True)

    def quantize_linear(self, linear: nn.Linear) -> nn.Module | None:
        if getattr(linear, _DYNAMIC_ATTRIBUTE, False):  # smoothed, but its input's range needs a step per token
            return Int8DynamicLinear.from_linear(linear)
        act_scale = getattr(linear, _SCALE_ATTRIBUTE, None)
        if act_scale is None:  # calibration never saw this layer's input: no scale to serve it with
            return None
        return Int8StaticLinear.from_linear(linear, act_scale)


def _alphas_by_kind(alphas: dict[str, float]) -> dict[str, list[float]]:
    """{"qkv": [α of layer 0, layer 1, ...], "o": [...], ...}: the chosen α of each group, for the report."""
    by_kind: dict[str, list[float]] = {}
    for name, alpha in alphas.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(round(alpha, 2))
    return by_kind
