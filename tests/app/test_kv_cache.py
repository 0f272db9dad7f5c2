"""The lean runner's static KV cache starts as uninitialised memory: NaN there must never reach the logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from app.engine.llama_runner import LlamaRunner

CPU = torch.device("cpu")
MAX_LEN = 48
PROMPTS = {0: [5, 17, 42, 7, 99], 1: [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7], 2: [250, 8]}


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def runner_with_cache(model: nn.Module, fill: float) -> LlamaRunner:
    runner = LlamaRunner(model, CPU, len(PROMPTS), MAX_LEN)
    runner.k_cache.fill_(fill)
    runner.v_cache.fill_(fill)
    return runner


def scenario(runner: LlamaRunner) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and logits of sequences of different lengths (masked attention), a partial step,
    a released middle row (the last row moves into it) and a late joiner in the freed slot."""
    chosen: list[int] = []
    rows: list[torch.Tensor] = []
    last: dict[int, int] = {}

    def keep(slot: int, logits: torch.Tensor) -> None:
        assert torch.isfinite(logits).all(), f"slot {slot}: non-finite logits"
        rows.append(logits)
        last[slot] = int(logits.argmax())
        chosen.append(last[slot])

    def step(slots: list[int]) -> None:
        for slot, logits in zip(slots, runner.decode(slots, [last[s] for s in slots]), strict=True):
            keep(slot, logits)

    for slot, prompt in PROMPTS.items():
        keep(slot, runner.prefill(slot, prompt))
    for _ in range(6):
        step([0, 1, 2])
    step([2, 0])  # not every live row, out of order
    runner.release(1)
    keep(1, runner.prefill(1, [11, 12, 13]))
    for _ in range(MAX_LEN - len(PROMPTS[1]) - 8):
        step([0, 1, 2])
    return chosen, rows


def test_nan_filled_cache_gives_the_same_greedy_run(tiny_llama):
    clean_tokens, clean_rows = scenario(runner_with_cache(tiny_llama, 0.0))
    nan_tokens, nan_rows = scenario(runner_with_cache(tiny_llama, float("nan")))
    assert nan_tokens == clean_tokens
    torch.testing.assert_close(torch.stack(nan_rows), torch.stack(clean_rows), atol=0, rtol=0)
