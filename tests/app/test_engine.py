"""The continuous-batching engine on the tiny random Llama, driven on the test's thread.

`Engine.run_until_idle` steps the scheduler on the calling thread, so joins,
cancellations and slot reuse happen at known steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.engine.engine import (
    ENGINE_FAILED,
    Engine,
    EngineOverloaded,
    EngineStopped,
    ErrorEvent,
    ErrorKind,
    Event,
    Finish,
    FinishReason,
    GenerationRequest,
    PromptEvent,
    TokenEvent,
)
from app.engine.runner import HFRunner, ModelRunner, make_runner
from app.engine.sampling import SamplingParams, apply_repetition_penalty
from app.model_loader import LoadedModel, eos_token_ids, load_model
from app.settings import load_settings
from tests.support.live_server import StepRecorder

MAX_LEN = 256
# Greedy choices closer than this (in logits) may flip between batched and single matmuls.
TIE_MARGIN = 1e-4

RunnerFactory = Callable[[LoadedModel, int], ModelRunner]
# transformers' forward (any model) and what the service picks (the lean Llama runner here)
RUNNERS: dict[str, RunnerFactory] = {
    "hf": lambda loaded, slots: HFRunner(loaded.model, loaded.device),
    "served": lambda loaded, slots: make_runner(loaded.model, loaded.device, slots, MAX_LEN),
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load_model(load_settings(model=str(tiny_model_dir), device="cpu"))


def prompt_ids(tiny: LoadedModel, text: str) -> list[int]:
    return tiny.tokenizer(text)["input_ids"]


def make_engine(
    tiny: LoadedModel, runner: ModelRunner | None = None, max_batch_size: int = 4, max_queue: int = 8, **kwargs
) -> Engine:
    runner = runner or RUNNERS["hf"](tiny, max_batch_size)
    return Engine(
        runner,
        tiny.tokenizer,
        eos_token_ids(tiny),
        tiny.device,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        **kwargs,
    )


def run(engine: Engine, requests: list[GenerationRequest], joins: dict[int, tuple[int, int]] | None = None):
    """Submit the requests and step until idle; request `i` in `joins` as {i: (j, k)} joins once `j` has k tokens."""
    joins = joins or {}
    events: list[list[Event]] = [[] for _ in requests]

    def emitter(i: int):
        def emit(event: Event) -> None:
            events[i].append(event)
            for later, (after, count) in joins.items():
                if after == i and len(events[i]) == count:
                    engine.submit(requests[later], emitter(later))

        return emit

    for i, request in enumerate(requests):
        if i not in joins:
            engine.submit(request, emitter(i))
    engine.run_until_idle()
    return events


def tokens(events: list[Event]) -> list[int]:
    return [e.id for e in events if isinstance(e, TokenEvent)]


def greedy(ids: list[int], n: int, **params) -> GenerationRequest:
    return GenerationRequest(ids, SamplingParams(max_new_tokens=n, **params))


class LogitsRecorder(StepRecorder):
    """Also keeps every logits row of slot 0 (the only slot when running alone)."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__(runner)
        self.rows: list[torch.Tensor] = []

    def prefill(self, slot: int, token_ids: list[int], all_positions: bool = False) -> torch.Tensor:
        logits = super().prefill(slot, token_ids, all_positions)
        self.rows.append((logits[-1] if all_positions else logits).clone())
        return logits

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        logits = super().decode(slots, token_ids)
        self.rows.append(logits[0].clone())
        return logits


def decision_margins(rows: list[torch.Tensor], prompt: list[int], chosen: list[int], penalty: float) -> list[float]:
    """Top-1 minus top-2 of the logits each greedy choice was made from (repetition penalty applied)."""
    margins, seen = [], list(prompt)
    for row, token in zip(rows, chosen, strict=False):
        top = torch.topk(apply_repetition_penalty(row.float(), torch.tensor(seen), penalty), 2).values
        margins.append(float(top[0] - top[1]))
        seen.append(token)
    return margins


PROMPTS = [
    "The",
    "Functions are defined with the def statement",
    "A class body is executed in a new namespace, and the local namespace is saved",
    "Exceptions are",
]
# The tiny random model, left alone, repeats its last token; a strong penalty makes greedy paths wander.
PENALTY = 10.0


def wandering(ids: list[int], n: int, **params) -> GenerationRequest:
    return greedy(ids, n, repetition_penalty=PENALTY, **params)


def wandering_to_the_end(ids: list[int], n: int) -> GenerationRequest:
    return wandering(ids, n, ignore_eos=True)


@pytest.mark.parametrize("runner_kind", sorted(RUNNERS))
def test_greedy_batched_matches_alone(tiny, runner_kind):
    """Each request's greedy tokens are the same alone as in a batch of others of different lengths, joining
    at different steps. Batched float matmuls may round differently, so a divergence is tolerated only
    right after a near-tie of the top two logits; before it, log-probabilities agree to float tolerance."""
    n = 24
    prompts = [prompt_ids(tiny, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    alone, margins = [], []
    for ids in prompts:
        recorder = LogitsRecorder(RUNNERS[runner_kind](tiny, 1))
        events = run(make_engine(tiny, recorder, max_batch_size=1), [wandering_to_the_end(ids, n)])[0]
        alone.append(events)
        margins.append(decision_margins(recorder.rows, ids, tokens(events), PENALTY))
    # 0 and 1 start together, 2 joins when 0 has 5 tokens, 3 when 1 has 11: the batch grows and shrinks.
    engine = make_engine(tiny, RUNNERS[runner_kind](tiny, 4), max_batch_size=4)
    batched = run(engine, [wandering_to_the_end(ids, n) for ids in prompts], joins={2: (0, 5), 3: (1, 11)})
    compared = 0
    for i, (single, together) in enumerate(zip(alone, batched, strict=True)):
        assert len(single) == len(together) == n
        assert len(set(tokens(single))) > n // 2  # a path worth comparing, not one token repeated
        for k, (a, b) in enumerate(zip(single, together, strict=True)):
            if a.id != b.id:
                assert margins[i][k] < TIE_MARGIN, f"request {i} diverged at token {k}, margin {margins[i][k]:.1e}"
                break
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            compared += 1
    assert compared >= len(prompts) * n // 2, "too many near-ties for the comparison to mean anything"


def test_logprobs_match_alone_in_a_batch(tiny):
    """Not only the argmax: the chosen tokens' log-probabilities agree to float tolerance."""
    ids_a, ids_b = prompt_ids(tiny, PROMPTS[1]), prompt_ids(tiny, PROMPTS[2])
    alone = run(make_engine(tiny, max_batch_size=1), [greedy(ids_a, 12)])[0]
    together = run(make_engine(tiny), [greedy(ids_a, 12), greedy(ids_b, 20)])[0]
    for single, batched in zip(alone, together, strict=True):
        assert single.id == batched.id
        assert single.logprob == pytest.approx(batched.logprob, abs=1e-4)


@pytest.mark.parametrize("runner_kind", sorted(RUNNERS))
def test_prompt_logprobs_are_transformers_and_change_nothing_else(tiny, runner_kind):
    """Each runner's all-position prefill scores the prompts as transformers' forward does, in a
    batch of three; the tokens generated after it are those of a plain prefill."""
    prompts = [prompt_ids(tiny, p) for p in PROMPTS[:3]]
    with torch.inference_mode():
        expected = [torch.log_softmax(tiny.model(torch.tensor([ids])).logits[0].float(), -1) for ids in prompts]
    scored = [GenerationRequest(ids, SamplingParams(max_new_tokens=4, prompt_logprobs=2)) for ids in prompts]
    together = run(make_engine(tiny, RUNNERS[runner_kind](tiny, 4)), scored)
    plain = run(make_engine(tiny, RUNNERS[runner_kind](tiny, 4)), [greedy(ids, 4) for ids in prompts])
    for ids, reference, events, plain_events in zip(prompts, expected, together, plain, strict=True):
        prompt = events[0]
        assert isinstance(prompt, PromptEvent) and prompt.finish is None
        assert [t.id for t in prompt.tokens] == ids and prompt.tokens[0].logprob is None
        for position, token in enumerate(prompt.tokens[1:], start=1):
            assert token.logprob == pytest.approx(float(reference[position - 1, ids[position]]), abs=1e-4)
            assert [t.id for t in token.top_logprobs] == reference[position - 1].topk(2).indices.tolist()
        assert tokens(events) == tokens(plain_events) and len(tokens(events)) == 4


def test_same_seed_samples_the_same_alone_or_batched(tiny):
    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids(tiny, PROMPTS[1]), SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.2, seed=seed)
        )

    alone = tokens(run(make_engine(tiny, max_batch_size=1), [sampled(7)])[0])
    others = [greedy(prompt_ids(tiny, p), 20) for p in PROMPTS[2:]]
    batched = run(make_engine(tiny), [*others, sampled(7), sampled(8)], joins={2: (0, 3)})
    assert tokens(batched[2]) == alone
    assert tokens(batched[3]) != alone  # another seed, another text: the seed is really used
    assert batched[2][-1].finish.seed == 7


def test_each_sequence_keeps_its_own_limits(tiny):
    """max_new_tokens, stop sequences and EOS end each sequence on its own; the others go on."""
    ids = prompt_ids(tiny, PROMPTS[1])
    reference = run(make_engine(tiny, max_batch_size=1), [wandering(ids, 16)])[0]
    text = reference[-1].finish.generated_text
    stop = next(e.text for e in reference[1:3] if e.text)  # ends the second request by its third token
    eos_token = reference[3].id  # ends the third at its fourth
    assert eos_token not in tokens(reference[:3])
    engine = make_engine(tiny)
    engine.eos_token_ids = {eos_token}
    requests = [
        wandering(ids, 3),
        wandering(ids, 16, stop=[stop]),
        wandering(ids, 16),
        wandering(ids, 16, ignore_eos=True),
    ]
    short, stopped, eos, ignoring = run(engine, requests)
    assert short[-1].finish.finish_reason == "length" and len(short) == 3
    assert stopped[-1].finish.finish_reason == "stop_sequence"
    assert stopped[-1].finish.generated_text == text[: text.index(stop)]
    # what a streaming client was shown never goes past the cut
    assert "".join(e.visible_text for e in stopped) == stopped[-1].finish.generated_text
    assert eos[-1].finish.finish_reason == "eos_token" and len(eos) == 4 and eos[-1].special
    assert ignoring[-1].finish.finish_reason == "length" and len(ignoring) == 16


def test_cancelled_sequence_leaves_within_one_step_and_frees_its_slot(tiny):
    recorder = StepRecorder(RUNNERS["hf"](tiny, 2))
    engine = make_engine(tiny, recorder, max_batch_size=2, max_queue=2)
    ids = prompt_ids(tiny, PROMPTS[1])
    victim, other, waiting = greedy(ids, 50), greedy(ids, 30), greedy(ids, 5)
    seen: list[Event] = []
    calls_at_cancel = []

    def emit_victim(event: Event) -> None:
        seen.append(event)
        if len(seen) == 4:  # the caller goes away after its 4th token
            engine.cancel(victim)
            calls_at_cancel.append(len(recorder.calls))

    engine.submit(victim, emit_victim)
    engine.submit(other, lambda e: None)
    done: list[Event] = []
    engine.submit(waiting, done.append)
    engine.run_until_idle()
    victim_slot = recorder.slots("prefill")[0][0]
    after_cancel = recorder.calls[calls_at_cancel[0] :]
    released_at = after_cancel.index(("release", [victim_slot]))
    # it is in no decode step after the one during which it was cancelled, and its slot is released...
    assert not any(name == "decode" and victim_slot in slots for name, slots in after_cancel[:released_at])
    assert len(seen) == 4
    # ...and given to the request that was waiting, long before `other` finished
    assert after_cancel[released_at + 1] == ("prefill", [victim_slot])
    assert done[-1].finish is not None and done[-1].finish.generated_tokens == 5
    assert engine.stats() == (0, 0)


def test_full_queue_refuses_at_once(tiny):
    engine = make_engine(tiny, max_batch_size=1, max_queue=1)
    ids = prompt_ids(tiny, PROMPTS[0])
    first, second = greedy(ids, 4), greedy(ids, 4)
    engine.submit(first, lambda e: None)
    engine.submit(second, lambda e: None)
    with pytest.raises(EngineOverloaded):
        engine.submit(greedy(ids, 4), lambda e: None)
    assert engine.stats() == (0, 2)  # nothing stepped yet: both wait
    engine.cancel(second)  # a waiting request that leaves frees its place at once
    assert engine.stats() == (0, 1)
    engine.submit(greedy(ids, 4), lambda e: None)
    engine.run_until_idle()
    assert engine.stats() == (0, 0)


def test_timeout_ends_waiting_and_running_requests(tiny):
    ids = prompt_ids(tiny, PROMPTS[1])
    expired = GenerationRequest(ids, SamplingParams(max_new_tokens=5), timeout=1e-9)
    assert run(make_engine(tiny), [expired])[0] == [ErrorEvent(expired_message(expired), ErrorKind.TIMEOUT)]
    slow = StepRecorder(RUNNERS["hf"](tiny, 1), step_seconds=0.01)
    running = GenerationRequest(ids, SamplingParams(max_new_tokens=200), timeout=0.2)
    events = run(make_engine(tiny, slow, max_batch_size=1), [running])[0]
    assert isinstance(events[0], TokenEvent) and isinstance(events[-1], ErrorEvent)
    assert events[-1].kind is ErrorKind.TIMEOUT and len(events) < 200


def expired_message(request: GenerationRequest) -> str:
    return f"generation took longer than the {request.timeout:g} s request timeout"


class WorkerDeath(BaseException):
    """Not an Exception: what a dying thread sees (as SystemExit would be)."""


def test_runner_failure_fails_every_request_at_once_and_stops_the_engine(tiny):
    runner = StepRecorder(RUNNERS["hf"](tiny, 1))
    faults: list[str] = []
    engine = make_engine(tiny, runner, max_batch_size=1, max_queue=2, on_fault=faults.append)
    ids = prompt_ids(tiny, PROMPTS[1])

    def broken_decode(slots: list[int], token_ids: list[int]) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    runner.runner.decode = broken_decode
    running, waiting = run(engine, [greedy(ids, 5), greedy(ids, 5)])  # one slot: the second one waits
    assert isinstance(running[0], TokenEvent)  # its prefill ran; the first decode step raised
    assert waiting == [ErrorEvent(ENGINE_FAILED, ErrorKind.GENERATION)]  # never ran, failed all the same
    assert running[-1] == ErrorEvent(ENGINE_FAILED, ErrorKind.GENERATION)
    assert faults == ["RuntimeError: kernel exploded"] and engine.failure == faults[0]
    assert engine.stats() == (0, 0)
    with pytest.raises(EngineStopped, match="engine stopped"):  # the model's state is unknown: no more requests
        engine.submit(greedy(ids, 1), lambda event: None)


def test_worker_thread_that_dies_fails_the_waiting_streams(tiny):
    runner = StepRecorder(RUNNERS["hf"](tiny, 1))
    faults: list[str] = []
    engine = make_engine(tiny, runner, max_batch_size=1, max_queue=1, on_fault=faults.append)
    ids = prompt_ids(tiny, PROMPTS[1])

    def dying_decode(slots: list[int], token_ids: list[int]) -> torch.Tensor:
        raise WorkerDeath("the worker thread dies")

    runner.runner.decode = dying_decode
    engine.start()

    async def both() -> list[list[Event]]:
        streams = [engine.open_stream(greedy(ids, 50)), engine.open_stream(greedy(ids, 50))]

        async def drain(stream) -> list[Event]:
            return [event async for event in stream]

        return await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), timeout=30)

    try:
        first, second = asyncio.run(both())
    finally:
        engine.stop()
    assert first[-1] == second[-1] == ErrorEvent(ENGINE_FAILED, ErrorKind.GENERATION)
    assert faults == ["WorkerDeath: the worker thread dies"]
    assert not engine._thread.is_alive()


class NaNForSlot(StepRecorder):
    """Decodes normally, but the logits row of one slot is NaN from its first decode step on."""

    def __init__(self, runner: ModelRunner, slot: int) -> None:
        super().__init__(runner)
        self.bad_slot = slot

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        logits = super().decode(slots, token_ids).clone()
        if self.bad_slot in slots:
            logits[slots.index(self.bad_slot)] = float("nan")
        return logits


def test_nan_logits_fail_that_sequence_alone(tiny):
    faults: list[str] = []
    runner = NaNForSlot(RUNNERS["hf"](tiny, 2), slot=0)  # the first request is admitted into slot 0
    engine = make_engine(tiny, runner, max_batch_size=2, on_fault=faults.append)
    ids = prompt_ids(tiny, PROMPTS[1])
    bad, good = run(engine, [greedy(ids, 8), greedy(ids, 8)])
    assert isinstance(bad[0], TokenEvent) and isinstance(bad[-1], ErrorEvent) and len(bad) == 2
    assert bad[-1].kind is ErrorKind.GENERATION and "NaN" in bad[-1].message
    assert good[-1].finish is not None and good[-1].finish.generated_tokens == 8
    assert faults == [] and engine.failure is None
    runner.bad_slot = -1  # the engine goes on serving
    again = run(engine, [greedy(ids, 4)])[0]
    assert again[-1].finish is not None and again[-1].finish.generated_tokens == 4


def test_worker_thread_streams_to_asyncio_and_closing_cancels(tiny):
    recorder = StepRecorder(RUNNERS["hf"](tiny, 2), step_seconds=0.005)
    engine = make_engine(tiny, recorder, max_batch_size=2)
    engine.start()
    ids = prompt_ids(tiny, PROMPTS[1])

    async def scenario() -> tuple[list[Event], list[Event]]:
        full = [event async for event in engine.open_stream(greedy(ids, 8))]
        partial = []
        async with engine.open_stream(greedy(ids, 500)) as stream:
            async for event in stream:
                partial.append(event)
                if len(partial) == 3:
                    break
        return full, partial

    try:
        full, partial = asyncio.run(scenario())
        assert full[-1].finish.generated_tokens == 8
        assert len(partial) == 3
        deadline = time.monotonic() + 10
        while engine.stats() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats() == (0, 0)
        assert len(recorder.slots("decode")) < 100  # the 500-token request did not run to its end
    finally:
        engine.stop()


def test_on_finish_sees_each_normal_end_once_before_its_last_event(tiny):
    """Called on the worker once per sequence that ends normally, after its slot is freed and before its
    last event goes out; never for a cancelled, expired or failed one."""
    finishes: list[Finish] = []
    runner = StepRecorder(RUNNERS["hf"](tiny, 2))
    engine = make_engine(tiny, runner, max_batch_size=2, max_queue=4, on_finish=finishes.append)
    ids = prompt_ids(tiny, PROMPTS[1])
    done, cancelled = greedy(ids, 3), greedy(ids, 50)
    expired = GenerationRequest(ids, SamplingParams(max_new_tokens=5), timeout=1e-9)
    at_the_end: list[tuple[list[Finish], tuple[int, int]]] = []
    others: list[Event] = []

    def emit_done(event: Event) -> None:
        if event.finish is not None:
            at_the_end.append((list(finishes), engine.stats()))

    def emit_cancelled(event: Event) -> None:
        others.append(event)
        if len(others) == 2:
            engine.cancel(cancelled)

    engine.submit(done, emit_done)
    engine.submit(cancelled, emit_cancelled)
    engine.submit(expired, others.append)
    engine.run_until_idle()
    assert len(finishes) == 1
    assert finishes[0].finish_reason is FinishReason.LENGTH and finishes[0].generated_tokens == 3
    assert at_the_end == [([finishes[0]], (0, 0))]  # recorded, and its slot free, when the caller saw the end
    assert [type(e) for e in others] == [ErrorEvent, TokenEvent, TokenEvent]  # the expired one's timeout first

    def broken_decode(slots: list[int], token_ids: list[int]) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    runner.runner.decode = broken_decode
    failed, one_token = run(engine, [greedy(ids, 5), greedy(ids, 1)])
    assert isinstance(failed[-1], ErrorEvent) and one_token[-1].finish is not None
    assert [f.generated_tokens for f in finishes] == [3, 1]  # the failed one is not counted
