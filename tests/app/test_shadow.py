"""Shadow scoring: replays of sampled answers on a reference mode, and the series they feed."""

from __future__ import annotations

import time

import pytest
import torch
from fastapi.testclient import TestClient

from app.engine.shadow import ReferenceReplay, reference_logits, score_replay
from app.model_loader import load_model
from app.service import ModelService
from tests.app.test_modes import metric_value

PROMPTS = ["Hello there", "The list of", "A function that", "In Python, a", "Return the"]


def test_identical_logits_score_as_perfect_agreement():
    logits = torch.randn(6, 50)
    generated = logits.argmax(-1).tolist()
    score = score_replay(logits, logits.clone(), generated)
    assert score.tokens == 6 and score.top1_agreements == 6 and score.first_divergence is None
    assert max(score.kl_per_token) < 1e-6


def test_score_finds_the_first_divergence_and_the_kl():
    reference = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    served = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    score = score_replay(served, reference, generated=[0, 0, 2])  # token 1 is not the reference's greedy choice
    assert score.top1_agreements == 2 and score.first_divergence == 1
    p = torch.softmax(reference[1], -1)
    expected = float((p * (p.log() - torch.log_softmax(served[1], -1))).sum())
    assert score.kl_per_token[0] == pytest.approx(0, abs=1e-6)
    assert score.kl_per_token[1] == pytest.approx(expected, rel=1e-5)


def test_score_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        score_replay(torch.zeros(3, 5), torch.zeros(2, 5), [0, 0, 0])


def test_reference_logits_are_the_teacher_forced_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tiny_llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt, generated = [1, 5, 9, 3], [7, 2, 11]
    logits = reference_logits(tiny_llama, prompt, generated)
    with torch.inference_mode():
        full = tiny_llama(input_ids=torch.tensor([prompt + generated])).logits[0]
    assert logits.shape == (3, full.shape[-1])
    # the logits that predicted generated[i] sit at position len(prompt) - 1 + i
    torch.testing.assert_close(logits, full[len(prompt) - 1 : len(prompt) + 2].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_tokens", [1, 2, 3, 5, 64])
def test_a_chunked_replay_gives_the_whole_forwards_logits(tiny_model_dir, chunk_tokens):
    from transformers import AutoModelForCausalLM

    tiny_llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt, generated = [1, 5, 9, 3, 8, 4], [7, 2, 11, 6]
    whole = reference_logits(tiny_llama, prompt, generated)
    replay = ReferenceReplay(tiny_llama, prompt, generated, chunk_tokens)
    steps = 0
    while not replay.finished:
        replay.step()
        steps += 1
    assert steps == -(-(len(prompt) + len(generated) - 1) // chunk_tokens)
    torch.testing.assert_close(replay.logits(), whole, atol=1e-4, rtol=1e-4)


def test_each_chunk_of_a_replay_is_its_own_turn(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from app.engine.fair_share import FairShare
    from app.engine.shadow import SHADOW, ShadowScorer

    class CountingShare(FairShare):
        turns = 0

        def turn(self, name):
            if name == SHADOW:
                CountingShare.turns += 1
            return super().turn(name)

    class Observer:
        def __init__(self) -> None:
            self.scores: list[tuple[list[float], int, int | None]] = []

        def observe_shadow(self, reference, kl_per_token, top1_agreements, first_divergence):
            self.scores.append((kl_per_token, top1_agreements, first_divergence))

        def count_shadow(self, reference, outcome):
            raise AssertionError(f"replay {outcome}")

    tiny_llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt, generated = list(range(1, 11)), [3, 4, 5, 6, 7, 8]  # 15 positions: 4 chunks of 4
    served = reference_logits(tiny_llama, prompt, generated)
    scorer = ShadowScorer("fp32", tiny_llama, CountingShare(), weight=0.05, chunk_tokens=4)
    scorer.start()
    observer = Observer()
    scorer.offer(observer, prompt, generated, served)
    scorer.join_queue()
    scorer.stop()
    assert CountingShare.turns == 4 and scorer.pending == 0
    ((kl, agreements, _),) = observer.scores
    assert agreements == len(generated) and max(kl) < 1e-6


def perturbing_loader(perturbed: str, scale: float = 10.0):
    """Builds each mode as usual, then adds noise to every 2-D weight of `perturbed`: a deliberately wrong mode."""

    def load(settings):
        loaded = load_model(settings)
        if settings.precision == perturbed:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for parameter in loaded.model.parameters():
                    if parameter.dim() == 2 and parameter.is_floating_point():
                        noise = torch.randn(parameter.shape, generator=generator) * parameter.float().std() * scale
                        parameter.add_(noise.to(parameter.dtype))
        return loaded

    return load


def wait_for_replays(service: ModelService, count: int) -> None:
    deadline = time.monotonic() + 60
    shadow = service.shadow
    assert shadow is not None
    while shadow.scored + shadow.failed + shadow.dropped < count and time.monotonic() < deadline:
        time.sleep(0.02)
    shadow.join_queue()


def greedy(client: TestClient, precision: str, prompt: str, tokens: int = 12) -> None:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens, "precision": precision}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200


def test_a_perturbed_mode_shows_lower_agreement(make_client):
    settings = {"precision": "int8,fp16,fp32", "shadow_reference": "fp32", "shadow_sample": 1.0}
    with make_client(loader=perturbing_loader("fp16"), **settings) as client:
        service: ModelService = client.app.state.service
        for prompt in PROMPTS:
            greedy(client, "int8", prompt)
            greedy(client, "fp16", prompt)
            greedy(client, "fp32", prompt)  # the reference's own answers are not replayed
        wait_for_replays(service, 2 * len(PROMPTS))
        metrics = client.get("/metrics").text
        info = client.get("/info").json()

    assert info["shadow"] == {
        "reference": "fp32",
        "sample": 1.0,
        "scored": 10,
        "failed": 0,
        "dropped": 0,
        "pending": 0,
    }
    figures = {}
    for mode in ("int8", "fp16"):
        labels = {"precision": mode, "reference": "fp32"}
        tokens = metric_value(metrics, "qs_shadow_tokens_total", **labels)
        assert tokens == 12 * len(PROMPTS)
        assert metric_value(metrics, "qs_shadow_replays_total", outcome="scored", **labels) == len(PROMPTS)
        agreement = metric_value(metrics, "qs_shadow_top1_agreements_total", **labels) / tokens
        mean_kl = metric_value(metrics, "qs_shadow_kl_divergence_sum", **labels) / tokens
        assert metric_value(metrics, "qs_shadow_kl_divergence_count", **labels) == tokens
        figures[mode] = (agreement, mean_kl)
    assert metric_value(metrics, "qs_shadow_tokens_total", precision="fp32") == 0
    int8_agreement, int8_kl = figures["int8"]
    perturbed_agreement, perturbed_kl = figures["fp16"]
    assert int8_agreement > 0.9, figures
    assert perturbed_agreement < int8_agreement - 0.2, figures
    assert perturbed_kl > 10 * int8_kl, figures
    # the perturbed answers leave the reference's greedy path early; int8's seldom do
    diverged = metric_value(metrics, "qs_shadow_first_divergence_position_count", precision="fp16")
    assert diverged >= 3


def test_a_failing_replay_is_counted_and_never_reaches_the_client(make_client, monkeypatch):
    import app.engine.shadow as shadow_module

    def broken(*args, **kwargs):
        raise RuntimeError("reference forward exploded")

    monkeypatch.setattr(shadow_module.ReferenceReplay, "step", broken)
    with make_client(precision="int8", shadow_reference="fp32", shadow_sample=1.0) as client:
        service: ModelService = client.app.state.service
        assert [m["precision"] for m in client.get("/info").json()["modes"]] == ["int8", "fp32"]
        assert [m["id"].rsplit(":", 1)[1] for m in client.get("/v1/models").json()["data"]] == ["int8"]
        greedy(client, "int8", "Hello")
        greedy(client, "int8", "Hello again")
        wait_for_replays(service, 2)
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "qs_shadow_replays_total", outcome="failed", precision="int8") == 2
        assert metric_value(metrics, "qs_shadow_tokens_total", precision="int8") == 0
        assert client.get("/health").json()["status"] == "ready"
        # the reference-only mode is not routable
        response = client.post("/generate", json={"inputs": "Hi", "parameters": {"precision": "fp32"}})
        assert response.status_code == 422


def test_unsampled_requests_keep_no_logits(make_client):
    with make_client(precision="int8,fp32", shadow_reference="fp32", shadow_sample=0.0) as client:
        service: ModelService = client.app.state.service
        assert service.shadow is None and "shadow" not in client.get("/info").json()
        greedy(client, "int8", "Hello")
        assert "qs_shadow_tokens_total{" not in client.get("/metrics").text
