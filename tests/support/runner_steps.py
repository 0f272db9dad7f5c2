"""One scenario of slot moves for comparing two model runners step by step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.engine.runner import ModelRunner

# A released middle sequence (the last row moves into its row), a late joiner, and steps over
# part of the batch (read through gathered rows).
RELEASE_JOIN_STEPS = [
    ([0, 1, 2], [11, 12, 13]),
    ("release", 0),
    ([2, 1], [14, 15]),
    ("prefill", 3, [21, 22, 23, 24]),
    ([1, 3, 2], [16, 17, 18]),
    ([3], [19]),
    ([2, 3], [20, 21]),
]

Compare = Callable[[torch.Tensor, torch.Tensor, str], None]


def replay_release_join(
    candidate: ModelRunner, reference: ModelRunner, prompts: list[list[int]], compare: Compare
) -> None:
    """Prefill `prompts` into slots 0.., then run RELEASE_JOIN_STEPS on both runners, comparing each result."""
    for runner in (candidate, reference):
        for slot, prompt in enumerate(prompts):
            runner.prefill(slot, prompt)
    for step in RELEASE_JOIN_STEPS:
        if step[0] == "release":
            candidate.release(step[1])
            reference.release(step[1])
        elif step[0] == "prefill":
            compare(candidate.prefill(step[1], step[2]), reference.prefill(step[1], step[2]), "prefill")
        else:
            compare(candidate.decode(*step), reference.decode(*step), f"decode {step}")
