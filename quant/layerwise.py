"""Run a Llama-family model's decoder layers one at a time over calibration sequences.

GPTQ and AWQ need, for each linear, statistics of the inputs it sees: Σ x xᵀ (GPTQ's Hessian,
AWQ's output-error metric) and mean |x| (AWQ's activation scale). Running the whole model per
layer would cost a forward of every layer for each layer, so instead:
- the inputs of the first decoder layer are captured once (its pre-hook stops the model there),
  with the keyword arguments the model passes it (rotary position embeddings, attention mask);
- each layer is then run in four stages, one per group of linears that share an input
  (q/k/v, o, gate/up, down). After each stage the group's statistics go to a callback, which may
  change the group's weights (GPTQ quantizes them) before the next stage runs on their outputs.
  So every linear is calibrated on the outputs of the already-processed ones (true-sequential);
- the layer's outputs are the next layer's inputs.

Only the Llama family's layer layout is supported (Llama, Mistral, Qwen2, SmolLM2): norms
`input_layernorm` / `post_attention_layernorm`, `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quant.calibration import CalibrationError

log = logging.getLogger(__name__)

# The groups of linears that share an input, in the order a layer's forward reaches them.
ATTENTION_IN = "attention_in"  # q, k, v: input_layernorm's output
ATTENTION_OUT = "attention_out"  # o: the attention's output
MLP_IN = "mlp_in"  # gate, up: post_attention_layernorm's output
MLP_OUT = "mlp_out"  # down: act(gate) * up
GROUPS: dict[str, tuple[str, ...]] = {
    ATTENTION_IN: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ATTENTION_OUT: ("self_attn.o_proj",),
    MLP_IN: ("mlp.gate_proj", "mlp.up_proj"),
    MLP_OUT: ("mlp.down_proj",),
}
_NORMS = ("input_layernorm", "post_attention_layernorm")
BATCH_SEQUENCES = 8  # sequences per forward: 8 x 512 tokens keeps the MLP's activations near 25 MB


@dataclass
class InputStats:
    """Running statistics of one input width's activations: Σ x xᵀ, Σ |x| and the token count."""

    width: int
    device: torch.device | str = "cpu"
    gram: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.width, self.width, dtype=torch.float64, device=self.device)
        self.abs_sum = torch.zeros(self.width, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, self.width).float()
        # float32 products of one batch, summed in float64 across batches
        self.gram += (rows.T @ rows).double()
        self.abs_sum += rows.abs().sum(dim=0).double()
        self.tokens += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2/n Σ x xᵀ (float32)."""
        return (self.gram * (2.0 / max(self.tokens, 1))).float()

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()


@dataclass
class LayerGroup:
    """What a stage hands its callback: the layer index, the group, its linears by full name, and their input's stats."""

    layer_index: int
    group: str
    linears: dict[str, nn.Linear]
    stats: InputStats


GroupCallback = Callable[[LayerGroup], None]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread meanwhile, for GPTQ's column loop and AWQ's searches: thousands of small ops.
    With two threads each op waits at a barrier for the other, and on a busy machine that costs 40x
    (GPTQ of a 960 x 576 weight: 45 s against 1.2 s while other processes held the 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Stop(Exception):
    """Raised by a pre-hook to end a forward once the input it wanted is captured."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, layers) of a Llama-family model, or a CalibrationError naming what is missing."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise CalibrationError(
            f"calibrated int4 modes need a Llama-family model (model.model.layers); {type(model).__name__} has none"
        )
    for name in (*_NORMS, *(n for names in GROUPS.values() for n in names), "mlp.act_fn"):
        try:
            module = layers[0].get_submodule(name)
        except AttributeError:
            module = None
        if module is None or (name.endswith("_proj") and not isinstance(module, nn.Linear)):
            raise CalibrationError(
                f"calibrated int4 modes need Llama-family decoder layers; {type(layers[0]).__name__} has no {name}"
            )
    return "model.layers", layers


def first_layer_inputs(
    model: nn.Module, sequences: torch.Tensor, batch_sequences: int = BATCH_SEQUENCES
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(hidden states, keyword arguments) the model passes its first decoder layer, per batch of sequences."""
    _, layers = decoder_layers(model)
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    hook = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in sequences.split(batch_sequences):
            with contextlib.suppress(_Stop):
                model(batch.to(device), use_cache=False)
    finally:
        hook.remove()
    return captured


def _stopped_input(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The input `module` receives when `run()` executes, stopping the run there."""
    seen: list[torch.Tensor] = []

    def grab(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].detach())
        raise _Stop

    hook = module.register_forward_pre_hook(grab)
    try:
        with contextlib.suppress(_Stop):
            run()
    finally:
        hook.remove()
    return seen[0]


def _group(layer: nn.Module, prefix: str, index: int, group: str, stats: InputStats) -> LayerGroup:
    linears = {f"{prefix}.{index}.{name}": layer.get_submodule(name) for name in GROUPS[group]}
    return LayerGroup(index, group, linears, stats)


def _stats(inputs: list[torch.Tensor]) -> InputStats:
    stats = InputStats(inputs[0].shape[-1], inputs[0].device)
    for x in inputs:
        stats.add(x)
    return stats


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    index: int,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    on_group: GroupCallback,
    prefix: str = "model.layers",
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run one decoder layer stage by stage over every batch (see the module doc); returns its outputs."""
    attn, mlp = layer.self_attn, layer.mlp
    normed = [layer.input_layernorm(h) for h, _ in inputs]
    on_group(_group(layer, prefix, index, ATTENTION_IN, _stats(normed)))
    attended = [
        _stopped_input(attn.o_proj, lambda x=x, kw=kw: attn(hidden_states=x, **kw))
        for x, (_, kw) in zip(normed, inputs, strict=True)
    ]
    del normed
    on_group(_group(layer, prefix, index, ATTENTION_OUT, _stats(attended)))
    residual = [h + attn.o_proj(a) for (h, _), a in zip(inputs, attended, strict=True)]
    del attended
    normed = [layer.post_attention_layernorm(h) for h in residual]
    on_group(_group(layer, prefix, index, MLP_IN, _stats(normed)))
    hidden = [mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) for x in normed]
    del normed
    on_group(_group(layer, prefix, index, MLP_OUT, _stats(hidden)))
    return [(h + mlp.down_proj(m), kw) for h, m, (_, kw) in zip(residual, hidden, inputs, strict=True)]


@torch.no_grad()
def run_layers(
    model: nn.Module,
    sequences: torch.Tensor,
    on_group: GroupCallback,
    after_layer: Callable[[int, nn.Module], None] | None = None,
    batch_sequences: int = BATCH_SEQUENCES,
) -> None:
    """Calibrate the model's decoder layers in order (see the module doc); `after_layer(index, layer)`
    runs once a layer's outputs are computed."""
    prefix, layers = decoder_layers(model)
    started = time.perf_counter()
    inputs = first_layer_inputs(model, sequences, batch_sequences)
    for index, layer in enumerate(layers):
        inputs = run_layer(layer, index, inputs, on_group, prefix)
        if after_layer is not None:
            after_layer(index, layer)
        log.info(
            "calibrated decoder layer %d/%d (%.0f s so far)", index + 1, len(layers), time.perf_counter() - started
        )
