"""Batching equivalence on the default model (fp32): token for token, no tolerance."""

from __future__ import annotations

import pytest

from app.engine.sampling import SamplingParams
from tests.app.test_engine import RUNNERS, GenerationRequest, make_engine, run, tokens

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint. Once upon a time,",
    "def fibonacci(n):",
]


@pytest.mark.parametrize("runner_kind", sorted(RUNNERS))
def test_greedy_tokens_identical_alone_and_batched(real_model, runner_kind):
    loaded = real_model("fp32")
    n = 12

    def request(text: str) -> GenerationRequest:
        ids = loaded.tokenizer(text)["input_ids"]
        return GenerationRequest(ids, SamplingParams(max_new_tokens=n, ignore_eos=True))

    def engine(slots: int):
        return make_engine(loaded, RUNNERS[runner_kind](loaded, slots), max_batch_size=slots)

    alone = [tokens(run(engine(1), [request(p)])[0]) for p in PROMPTS]
    batched = run(engine(3), [request(p) for p in PROMPTS], joins={2: (0, 4)})
    assert [tokens(e) for e in batched] == alone
    assert all(len(t) == n for t in alone)
