"""Model runners: the only engine code that calls the model's forward.

A runner keeps the KV cache of each live sequence under a slot number, so the
scheduler can add and drop sequences between steps.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import nn

from app.engine.llama_runner import LlamaRunner, unsupported_reason
from app.engine.native_runner import NativeRunner, native_unsupported_reason

log = logging.getLogger(__name__)


class ModelRunner(Protocol):
    def prefill(self, slot: int, token_ids: list[int], all_positions: bool = False) -> torch.Tensor:
        """Run the prompt of a new sequence; return float logits of its last position, shape [vocab],
        or with `all_positions` of every position, [len(token_ids), vocab] (prompt log-probs)."""
        ...

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """One step for each slot with its last token; return logits [len(slots), vocab]."""
        ...

    def release(self, slot: int) -> None:
        """Forget the sequence in `slot`."""
        ...


class HFRunner:
    """Works with any transformers causal LM: one DynamicCache per sequence."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        self.model = model
        self.device = device
        self._caches: dict[int, object] = {}
        self._lengths: dict[int, int] = {}

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], all_positions: bool = False) -> torch.Tensor:
        cache = self._cache_cls(config=self.model.config)
        ids = torch.tensor([token_ids], device=self.device)
        keep = 0 if all_positions else 1  # transformers: 0 keeps every position
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        self._caches[slot] = out.past_key_values
        self._lengths[slot] = len(token_ids)
        return out.logits[0].float() if all_positions else out.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        rows = []
        for slot, token in zip(slots, token_ids, strict=True):
            pos = self._lengths[slot]
            out = self.model(
                input_ids=torch.tensor([[token]], device=self.device),
                past_key_values=self._caches[slot],
                use_cache=True,
                position_ids=torch.tensor([[pos]], device=self.device),
            )
            self._caches[slot] = out.past_key_values
            self._lengths[slot] = pos + 1
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def release(self, slot: int) -> None:
        self._caches.pop(slot, None)
        self._lengths.pop(slot, None)


def make_runner(model: nn.Module, device: torch.device, max_slots: int, max_len: int) -> ModelRunner:
    """The best runner that can take `model`: the native decode step, else the lean Llama-family
    forward, else transformers' forward. Why a better one was not used is logged."""
    reason = native_unsupported_reason(model, max_len)
    if reason is None:
        return NativeRunner(model, device, max_slots, max_len)
    log.info("native decode step not used (%s)", reason)
    reason = unsupported_reason(model, max_len)
    if reason is None:
        return LlamaRunner(model, device, max_slots, max_len)
    log.info("lean runner not used (%s): running transformers' forward", reason)
    return HFRunner(model, device)


def runner_name(runner: ModelRunner) -> str:
    """What /info reports as the decode path."""
    if isinstance(runner, NativeRunner):
        return "native"
    return "lean" if isinstance(runner, LlamaRunner) else "transformers"
