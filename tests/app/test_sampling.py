"""Unit tests of top-k / top-p sampling (app/engine/sampling.py): which tokens can ever be drawn."""

from __future__ import annotations

import math

import pytest
import torch

from app.engine.sampling import SamplingParams, choose_token, warp

NO_TOKENS = torch.empty(0, dtype=torch.long)
DRAWS = 400
# probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled order, so the filters must sort)
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log()


def draw(logits: torch.Tensor, params: SamplingParams, seed: int) -> tuple[int, float]:
    choice = choose_token(logits, params, torch.Generator().manual_seed(seed), NO_TOKENS)
    return choice.token, choice.logprob


def drawn(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    return {draw(logits, params, seed)[0] for seed in range(DRAWS)}


def random_rows(count: int, vocab: int = 50) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(vocab, generator=generator) * 3 for _ in range(count)]


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "temperature": 1.5}])
def test_top_k_1_and_tiny_top_p_are_greedy(params):
    sampled = SamplingParams(do_sample=True, **params)
    assert sampled.sampling  # the warpers really run: this is not the greedy path
    for seed, row in enumerate(random_rows(50)):
        token, logprob = draw(row, sampled, seed)
        assert token == int(row.argmax())
        # reported under the raw logits, not the filtered distribution (where it holds all the mass)
        assert logprob == pytest.approx(float(torch.log_softmax(row, -1).max()), abs=1e-6)
        assert logprob < -1e-3


def test_top_k_never_draws_outside_the_k_most_likely():
    results = dict(draw(LOGITS, SamplingParams(do_sample=True, top_k=2), seed) for seed in range(DRAWS))
    assert results.keys() == {1, 3}  # both kept tokens appear; nothing else ever does
    # the log-probs are the model's, not the renormalised survivors' (0.5 / 0.8 and 0.3 / 0.8)
    assert results[1] == pytest.approx(math.log(0.5), abs=1e-5)
    assert results[3] == pytest.approx(math.log(0.3), abs=1e-5)


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.45, {1}), (0.75, {1, 3}), (0.9, {1, 3, 0}), (0.99, {0, 1, 2, 3})],
)
def test_top_p_never_draws_outside_the_nucleus(top_p, nucleus):
    """The nucleus is the most likely tokens until their mass reaches top_p (the one crossing it included)."""
    assert drawn(LOGITS, SamplingParams(do_sample=True, top_p=top_p)) == nucleus


def test_warp_masks_exactly_the_filtered_tokens():
    warped = warp(LOGITS.clone(), SamplingParams(do_sample=True, top_k=3, top_p=0.75))
    assert torch.isinf(warped).tolist() == [True, False, True, False]
    assert torch.equal(warped[[1, 3]], LOGITS[[1, 3]])


def test_same_seed_same_draws_and_seeds_matter():
    params = SamplingParams(do_sample=True, top_k=3, top_p=0.95, temperature=0.8)
    rows = random_rows(30)

    def run(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)  # one generator for the whole sequence, as the engine does
        return [choose_token(row, params, generator, NO_TOKENS)[0] for row in rows]

    assert run(7) == run(7)
    assert len({tuple(run(seed)) for seed in range(5)}) > 1


def test_choose_token_samples_on_one_intra_op_thread_and_restores_the_count(monkeypatch) -> None:
    # A parallel region over one row wakes OpenMP workers that then spin on the cores the native
    # decode step's thread team needs: sampling runs on the calling thread alone.
    from app.engine import sampling

    seen_threads = []
    real = sampling._choose_token

    def recording(*args):
        seen_threads.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(sampling, "_choose_token", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        token = sampling.choose_token(torch.tensor([0.0, 3.0, 1.0]), SamplingParams(), None, torch.empty(0)).token
        assert token == 1 and seen_threads == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
