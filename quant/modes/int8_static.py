"""int8-static: W8A8 with calibrated per-tensor activation scales, after SmoothQuant's migration.

Calibration runs the float model twice over the calibration sequences:
1. per-channel max |x| of every linear's input -> SmoothQuant factors (`quant.smoothquant`), folded
   into the norms, v_proj and up_proj (skipped when `smoothquant_alpha` is 0);
2. on the smoothed model, a histogram of |x| per input -> the observer's clipping value c
   (`quant.observers`); the input's int8 step is c / 127, fixed from then on.
Each linear is then int8 per output channel, and at run time its input is quantized with that
fixed step: no per-token absmax. Linears that read one input (q/k/v, gate/up) share one step.
A linear calibration did not see (e.g. a GPT-2 Conv1D) stays float and is counted as a fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quant.config import CalibratedConfig, knob_default
from quant.layers.int8_static import Int8StaticLinear
from quant.observers import HistogramObserver
from quant.registry import register_mode
from quant.smoothquant import SmoothGroup, apply_smoothing, llama_groups, smoothing_factors

log = logging.getLogger(__name__)

_BATCH_SEQUENCES = 4  # calibration sequences per forward (memory: activations of 4 x 512 tokens)
_SCALE_ATTRIBUTE = "static_act_scale"  # set on each calibrated nn.Linear, read by quantize_linear


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
        "W8A8: int8 per-channel weights, int8 activations with calibrated per-tensor scales (SmoothQuant first)"
    )
    bits: ClassVar[float] = 8
    quantizes_activations: ClassVar[bool] = True

    activation_observer: str = knob_default("activation_observer")
    smoothquant_alpha: float = knob_default("smoothquant_alpha")

    def calibrate(self, model: nn.Module, sequences: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        groups = llama_groups(model)  # linears that share an input share one step, smoothed or not
        readers = _input_readers(model, groups)
        if self.smoothquant_alpha == 0:  # the knob's "off"
            groups = []
        # pass 1: per-channel max |x| of every observed input (SmoothQuant's statistic, and the range)
        channel_max: dict[str, torch.Tensor] = {}

        def track(name: str) -> Any:
            def observe(x: torch.Tensor) -> None:
                current = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(0).cpu()
                channel_max[name] = torch.maximum(channel_max[name], current) if name in channel_max else current

            return observe

        _run(model, sequences, {name: track(name) for name in readers})
        state: dict[str, torch.Tensor] = {}
        top = {name: float(m.max()) for name, m in channel_max.items()}
        for group in groups:  # every factor from the unsmoothed weights, then folded
            factors = smoothing_factors(model, group, channel_max[group.readers[0]], self.smoothquant_alpha)
            state[f"smooth.{group.name}"] = factors
        for group in groups:
            factors = state[f"smooth.{group.name}"]
            apply_smoothing(model, group, factors)
            # the smoothed input's range: channel j now peaks at max|x_j| / s_j
            top[group.readers[0]] = float((channel_max[group.readers[0]] / factors[group.channel_map]).max())
        # pass 2: histograms of the (smoothed) inputs -> the observer's clipping value per input
        observers = {name: HistogramObserver(top[name] * 1.001) for name in readers}
        _run(model, sequences, {name: observers[name].observe for name in readers})
        clips = []
        for name, observer in observers.items():
            clip = observer.clip(self.activation_observer)
            clips.append(clip / max(observer.max_seen, 1e-12))
            for reader in readers[name]:
                state[f"act_scale.{reader}"] = torch.tensor([clip / 127], dtype=torch.float32)
        self._set_scales(model, state)
        details = {
            "observer": self.activation_observer,
            "smoothquant_alpha": self.smoothquant_alpha,
            "smoothed_groups": len(groups),
            "observed_inputs": len(readers),
            "mean_clip_over_max": sum(clips) / max(len(clips), 1),
        }
        return state, details

    def apply_calibration(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        groups = {group.name: group for group in llama_groups(model)}
        for key, factors in state.items():
            if key.startswith("smooth."):
                apply_smoothing(model, groups[key.removeprefix("smooth.")], factors)
        self._set_scales(model, state)

    @staticmethod
    def _set_scales(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for key, scale in state.items():
            if key.startswith("act_scale."):
                setattr(model.get_submodule(key.removeprefix("act_scale.")), _SCALE_ATTRIBUTE, float(scale))

    def quantize_linear(self, linear: nn.Linear) -> nn.Module | None:
        act_scale = getattr(linear, _SCALE_ATTRIBUTE, None)
        if act_scale is None:  # calibration never saw this layer's input: no scale to serve it with
            return None
        return Int8StaticLinear.from_linear(linear, act_scale)
