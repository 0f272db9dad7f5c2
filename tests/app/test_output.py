"""The output processor alone: hand-made logits and a four-token vocabulary, no model."""

from __future__ import annotations

import time

import pytest
import torch

from app.engine.events import FinishReason, TokenEvent
from app.engine.output import OutputProcessor, SamplingFailed, SequenceState
from app.engine.sampling import SamplingParams
from app.engine.scheduler import GenerationRequest

VOCAB = ["a", "b", "c", "</s>"]
EOS = 3


class CharTokenizer:
    all_special_ids = (EOS,)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and i == EOS))


def processor() -> OutputProcessor:
    return OutputProcessor(CharTokenizer(), {EOS}, torch.device("cpu"))


def one_hot(token: int) -> torch.Tensor:
    row = torch.zeros(len(VOCAB))
    row[token] = 5.0
    return row


def run(tokens: list[int], prompt: list[int] | None = None, **params) -> tuple[SequenceState, list[TokenEvent]]:
    """Feed logits that make greedy choose `tokens`, until the sequence ends or they run out."""
    out = processor()
    admitted_at = time.perf_counter()  # a quarter of a second after the request's arrival
    request = GenerationRequest(prompt or [0], SamplingParams(**params), enqueued_at=admitted_at - 0.25)
    state = out.open(request, admitted_at=admitted_at)
    events = []
    for token in tokens:
        events.append(out.process(state, one_hot(token)))
        if events[-1].finish is not None:
            break
    return state, events


def test_length_ends_after_max_new_tokens_with_everything_shown():
    state, events = run([0, 1, 2, 0, 1], max_new_tokens=3)
    assert [e.id for e in events] == [0, 1, 2]
    assert [e.index for e in events] == [0, 1, 2]
    assert [e.finish is None for e in events] == [True, True, False]
    finish = events[-1].finish
    assert finish.finish_reason is FinishReason.LENGTH
    assert finish.generated_text == "abc" == "".join(e.visible_text for e in events)
    assert (finish.generated_tokens, finish.prompt_tokens, finish.seed) == (3, 1, None)
    assert finish.queue_seconds == pytest.approx(0.25)
    assert finish.queue_seconds <= finish.first_token_seconds <= finish.total_seconds
    assert state.last_token == 2 and state.generated == 3


def test_eos_ends_the_sequence_and_releases_held_back_text():
    _, events = run([0, 1, EOS, 2], max_new_tokens=10, stop=["bc"])
    assert [e.visible_text for e in events] == ["a", "", "b"]  # "b" was held back: it could start "bc"
    last = events[-1]
    assert (last.id, last.text, last.special) == (EOS, "", True)
    assert last.finish.finish_reason is FinishReason.EOS_TOKEN
    assert last.finish.generated_text == "ab"


def test_ignore_eos_goes_on_to_the_budget():
    _, events = run([EOS, EOS, 0], max_new_tokens=3, ignore_eos=True)
    assert [e.id for e in events] == [EOS, EOS, 0]
    assert events[-1].finish.finish_reason is FinishReason.LENGTH


def test_stop_sequence_cuts_the_text_and_nothing_past_the_cut_is_shown():
    _, events = run([0, 1, 2, 0], max_new_tokens=10, stop=["bc"])
    assert len(events) == 3
    assert events[-1].finish.finish_reason is FinishReason.STOP_SEQUENCE
    assert events[-1].finish.generated_text == "a"
    assert "".join(e.visible_text for e in events) == "a"
    assert [e.text for e in events] == ["a", "b", "c"]  # each token's own text is still reported


def test_repetition_penalty_remembers_the_prompt_and_the_output():
    out = processor()
    request = GenerationRequest([0], SamplingParams(max_new_tokens=10, repetition_penalty=2.0))
    state = out.open(request, admitted_at=request.enqueued_at)
    logits = torch.tensor([2.0, 1.5, 1.2, -9.0])
    chosen = [out.process(state, logits).id for _ in range(3)]
    # 0 is in the prompt (2.0 -> 1.0): 1 wins; then 1 is seen too (0.75): 2 wins (0.6 < 1.0): then 0
    assert chosen == [1, 2, 0]
    assert state.seen == [0, 1, 2, 0]


def test_a_seed_gives_the_same_samples_and_no_seed_gets_one():
    logits = torch.tensor([1.0, 1.0, 1.0, -9.0])

    def sample(seed: int | None) -> tuple[list[int], int | None]:
        out = processor()
        request = GenerationRequest([0], SamplingParams(max_new_tokens=12, do_sample=True, seed=seed))
        state = out.open(request, admitted_at=request.enqueued_at)
        events = [out.process(state, logits) for _ in range(12)]
        return [e.id for e in events], events[-1].finish.seed

    assert sample(7) == sample(7)
    assert sample(7)[0] != sample(8)[0]
    tokens, seed = sample(None)
    assert seed is not None and sample(seed)[0] == tokens


def test_a_sampling_error_is_reported_as_sampling_failed():
    out = processor()
    request = GenerationRequest([99], SamplingParams(repetition_penalty=1.5))  # a prompt id outside the logits
    state = out.open(request, admitted_at=request.enqueued_at)
    with pytest.raises(SamplingFailed):
        out.process(state, one_hot(0))
    assert state.generated == 0


def test_top_logprobs_are_the_raw_distributions_best_first():
    out = processor()
    request = GenerationRequest([0], SamplingParams(top_logprobs=2, repetition_penalty=3.0))
    state = out.open(request, admitted_at=time.perf_counter())
    logits = torch.tensor([2.0, 1.0, 0.5, 3.0])
    event = out.process(state, logits)
    expected = torch.log_softmax(logits, -1)
    assert event.id == 3 and event.logprob == pytest.approx(float(expected[3]))
    assert [(t.id, t.text, t.special) for t in event.top_logprobs] == [(3, "</s>", True), (0, "a", False)]
    assert [t.logprob for t in event.top_logprobs] == pytest.approx([float(expected[3]), float(expected[0])])


def test_prompt_event_scores_each_token_from_the_positions_before_it():
    out = processor()
    prompt = [0, 2, 1]
    request = GenerationRequest(prompt, SamplingParams(prompt_logprobs=1))
    state = out.open(request, admitted_at=time.perf_counter())
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    event = out.prompt(state, logits)
    rows = torch.log_softmax(logits, -1)
    assert [t.id for t in event.tokens] == prompt and [t.text for t in event.tokens] == ["a", "c", "b"]
    assert event.tokens[0].logprob is None and event.tokens[0].top_logprobs == []
    assert event.tokens[1].logprob == pytest.approx(float(rows[0, 2]))
    assert event.tokens[2].logprob == pytest.approx(float(rows[1, 1]))
    assert [t.id for t in event.tokens[1].top_logprobs] == [2] and [t.id for t in event.tokens[2].top_logprobs] == [0]
    assert event.finish is None  # tokens follow


def test_max_new_tokens_0_ends_at_the_prompt():
    out = processor()
    state = out.open(GenerationRequest([0, 1], SamplingParams(max_new_tokens=0)), admitted_at=time.perf_counter())
    event = out.prompt(state, None)
    assert event.tokens == []
    assert event.finish is not None and event.finish.finish_reason is FinishReason.LENGTH
    assert (event.finish.generated_tokens, event.finish.prompt_tokens, event.finish.generated_text) == (0, 2, "")


def test_kept_logits_are_copied_and_stacked_on_one_thread():
    """A shadowed request keeps a copy of each logits row: a row is big enough (a real vocabulary) for
    a parallel region, whose spinning OpenMP worker would take a core from the next decode step."""
    from torch.overrides import TorchFunctionMode

    class ThreadsAtCopy(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, int]] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("to", "stack"):
                self.seen.append((func.__name__, torch.get_num_threads()))
            return func(*args, **(kwargs or {}))

    out = processor()
    request = GenerationRequest([0], SamplingParams(max_new_tokens=2), keep_logits=True)
    state = out.open(request, time.perf_counter())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mode = ThreadsAtCopy()
        with mode:
            out.process(state, one_hot(1))
            out.process(state, one_hot(2))
            kept = OutputProcessor.kept_logits(state)
    finally:
        torch.set_num_threads(threads)
    assert kept.shape == (2, len(VOCAB)) and state.kept_tokens == [1, 2]
    copies = [n for name, n in mode.seen if name in ("to", "stack")]
    assert len(copies) >= 3 and set(copies) == {1}
