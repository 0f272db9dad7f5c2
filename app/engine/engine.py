"""The generation engine: one worker thread owns the model; asyncio callers stream events.

Continuous batching. Between two decode steps the worker drops the sequences
whose caller went away or whose time ran out, admits waiting requests into the
free slots (prefill, then their first token), and then runs one decode step
for every live sequence together. A sequence leaves the batch, and frees its
slot, as soon as it finishes. Each sequence keeps its own sampling parameters,
random generator, stop sequences and token budget.

Events travel back to the caller's event loop through `call_soon_threadsafe`,
so the loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.runner import ModelRunner
from app.engine.sampling import SamplingParams, choose_token
from app.engine.stops import StopMatcher

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """Every batch slot is busy and the waiting queue is full."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no more requests."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    timeout: float | None = None  # seconds from arrival, waiting included
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.enqueued_at > self.timeout


@dataclass
class Finish:
    """How a sequence ended; all times are seconds from its arrival."""

    generated_text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    queue_seconds: float
    first_token_seconds: float
    total_seconds: float


@dataclass
class TokenEvent:
    index: int
    id: int
    text: str  # this token's text (TGI's `token.text`)
    visible_text: str  # text that became safe to show, stop sequences considered
    logprob: float
    special: bool
    finish: Finish | None = None  # set on the sequence's last token


@dataclass
class ErrorEvent:
    message: str
    error_type: str = "generation"  # "generation" | "timeout" | "unavailable"


Event = TokenEvent | ErrorEvent
Emit = Callable[[Event], None]
StateCallback = Callable[[int, int], None]  # (running, waiting)
BatchCallback = Callable[[int], None]  # sequences in a decode step


@dataclass
class _Pending:
    request: GenerationRequest
    emit: Emit


class _Sequence:
    """Worker-side state of one admitted request."""

    def __init__(self, pending: _Pending, tokenizer: Any, device: torch.device) -> None:
        request = pending.request
        params = request.params
        self.request = request
        self.emit = pending.emit
        self.slot = -1
        self.seed = params.seed
        self.generator: torch.Generator | None = None
        if params.sampling:
            self.seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        # prompt and output tokens, kept only when the repetition penalty needs them
        self.seen = list(request.prompt_ids) if params.repetition_penalty is not None else None
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.generated = 0
        self.last_token = -1
        self.admitted_at = time.perf_counter()
        self.first_token_at: float | None = None


class EventStream:
    """The caller's end of one request: async-iterate its events; closing it cancels the request.

    The worker holds the stream weakly, so a stream that its caller dropped
    without closing is cancelled too.
    """

    def __init__(self, engine: Engine, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._engine = engine
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._done = False

    def emitter(self) -> Emit:
        ref = weakref.ref(self)
        request, loop = self.request, self._loop

        def emit(event: Event) -> None:
            stream = ref()
            if stream is None:
                request.cancelled.set()
                return
            try:
                loop.call_soon_threadsafe(stream._events.put_nowait, event)
            except RuntimeError:  # the caller's event loop is closed: nobody listens
                request.cancelled.set()

        return emit

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        self._done = isinstance(event, ErrorEvent) or event.finish is not None
        return event

    def close(self) -> None:
        """Cancel the request unless it already ended; its slot frees within one decode step."""
        if not self._done:
            self._done = True
            self._engine.cancel(self.request)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        eos_token_ids: set[int],
        device: torch.device,
        *,
        max_batch_size: int = 1,
        max_queue: int = 0,
        on_state: StateCallback | None = None,
        on_batch: BatchCallback | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._on_state = on_state
        self._on_batch = on_batch
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []))
        self._no_tokens = torch.empty(0, dtype=torch.long, device=device)
        # shared with the callers' threads, under _cond
        self._cond = threading.Condition()
        self._waiting: deque[_Pending] = deque()
        self._in_flight = 0  # submitted and not yet finished: waiting + running
        self._stopping = False
        # the worker's own
        self._running: list[_Sequence] = []
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self._thread = threading.Thread(target=self._work, name="engine-worker", daemon=True)

    # --- callers' side -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest, emit: Emit) -> None:
        """Queue a request; `emit` gets its events on the worker thread. Thread-safe."""
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if self._in_flight >= self.max_batch_size + self.max_queue:
                raise EngineOverloaded(
                    f"all {self.max_batch_size} batch slots are busy and {len(self._waiting)} requests wait; retry later"
                )
            self._waiting.append(_Pending(request, emit))
            self._in_flight += 1
            self._cond.notify()
        self._publish_state()

    def open_stream(self, request: GenerationRequest) -> EventStream:
        """Submit from a coroutine; iterate the returned stream for the events."""
        stream = EventStream(self, request, asyncio.get_running_loop())
        self.submit(request, stream.emitter())
        return stream

    def cancel(self, request: GenerationRequest) -> None:
        """Drop a request: at once if it still waits, else at the start of the next step."""
        request.cancelled.set()
        with self._cond:
            for pending in self._waiting:
                if pending.request is request:
                    self._waiting.remove(pending)
                    self._in_flight -= 1
                    break
        self._publish_state()

    def stats(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cond:
            return self._in_flight - len(self._waiting), len(self._waiting)

    def run_until_idle(self) -> None:
        """Step on the calling thread until every submitted request ended (warm-up and tests, before `start`)."""
        if self._thread.is_alive():
            raise RuntimeError("the worker thread owns the model")
        while self._has_work():
            self._step()

    def run_blocking(self, request: GenerationRequest) -> list[Event]:
        """Run one request to its end on the calling thread (before `start`)."""
        events: list[Event] = []
        self.submit(request, events.append)
        self.run_until_idle()
        return events

    # --- the worker ----------------------------------------------------------
    def _has_work(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._running)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running):
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self._step()
            except Exception:  # keep serving: fail what was running, take the next requests
                log.exception("engine step failed")
                for sequence in list(self._running):
                    self._fail(sequence, ErrorEvent("generation failed"))
        self._abort_all()

    def _step(self) -> None:
        """Drop cancelled and expired sequences, admit waiting ones, then decode the batch once."""
        now = time.perf_counter()
        for sequence in list(self._running):
            if sequence.request.cancelled.is_set():
                self._retire(sequence)
            elif sequence.request.expired(now):
                self._fail(sequence, _timeout_error(sequence.request))
        self._expire_waiting(now)
        for sequence in self._admit():
            self._prefill(sequence)
        if self._running:
            self._decode()
        self._publish_state()

    def _expire_waiting(self, now: float) -> None:
        with self._cond:
            expired = [p for p in self._waiting if p.request.expired(now)]
            for pending in expired:
                self._waiting.remove(pending)
                self._in_flight -= 1
        for pending in expired:
            pending.emit(_timeout_error(pending.request))

    def _admit(self) -> list[_Sequence]:
        with self._cond:
            admitted = []
            while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                admitted.append(self._waiting.popleft())
        return [_Sequence(pending, self.tokenizer, self.device) for pending in admitted]

    def _prefill(self, sequence: _Sequence) -> None:
        sequence.slot = self._free_slots.pop()
        self._running.append(sequence)
        try:
            logits = self.runner.prefill(sequence.slot, sequence.request.prompt_ids)
        except Exception:
            log.exception("prefill failed")
            self._fail(sequence, ErrorEvent("generation failed"))
            return
        self._advance(sequence, logits)

    def _decode(self) -> None:
        batch = list(self._running)
        try:
            logits = self.runner.decode([s.slot for s in batch], [s.last_token for s in batch])
        except Exception:
            log.exception("decode step failed for %d sequences", len(batch))
            for sequence in batch:
                self._fail(sequence, ErrorEvent("generation failed"))
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        for sequence, row in zip(batch, logits, strict=True):
            self._advance(sequence, row)

    def _advance(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        """Choose the sequence's next token from its logits, emit it, and retire the sequence if it is done."""
        params = sequence.request.params
        seen = self._no_tokens if sequence.seen is None else torch.tensor(sequence.seen, device=self.device)
        try:
            token, logprob = choose_token(logits, params, sequence.generator, seen)
        except Exception:
            log.exception("sampling failed")
            self._fail(sequence, ErrorEvent("generation failed"))
            return
        sequence.generated += 1
        sequence.last_token = token
        sequence.first_token_at = sequence.first_token_at or time.perf_counter()
        if sequence.seen is not None:
            sequence.seen.append(token)
        reason = None
        if token in self.eos_token_ids and not params.ignore_eos:
            text, visible, reason = "", sequence.stops.flush(), "eos_token"
        else:
            text = sequence.detokenizer.push(token)
            visible = sequence.stops.push(text)
            if sequence.stops.stopped:
                reason = "stop_sequence"
            elif sequence.generated >= params.max_new_tokens:
                visible += sequence.stops.flush()
                reason = "length"
        special = token in self._special_ids or token in self.eos_token_ids
        event = TokenEvent(sequence.generated - 1, token, text, visible, logprob, special)
        if reason is not None:
            event.finish = self._finish(sequence, reason)
        sequence.emit(event)

    def _finish(self, sequence: _Sequence, reason: str) -> Finish:
        # Retire first: by the time the caller sees the end, its slot is free for its next request.
        self._retire(sequence)
        arrived = sequence.request.enqueued_at
        return Finish(
            generated_text=sequence.stops.text,
            finish_reason=reason,
            generated_tokens=sequence.generated,
            prompt_tokens=len(sequence.request.prompt_ids),
            seed=sequence.seed,
            queue_seconds=sequence.admitted_at - arrived,
            first_token_seconds=(sequence.first_token_at or sequence.admitted_at) - arrived,
            total_seconds=time.perf_counter() - arrived,
        )

    def _fail(self, sequence: _Sequence, error: ErrorEvent) -> None:
        self._retire(sequence)
        sequence.emit(error)

    def _retire(self, sequence: _Sequence) -> None:
        self._running.remove(sequence)
        try:
            self.runner.release(sequence.slot)
        finally:
            self._free_slots.append(sequence.slot)
            with self._cond:
                self._in_flight -= 1

    def _abort_all(self) -> None:
        """On stop: tell everyone still waiting or running that the server goes away."""
        with self._cond:
            pending = list(self._waiting)
            self._waiting.clear()
            self._in_flight -= len(pending)
        error = ErrorEvent("the server is shutting down", "unavailable")
        for sequence in list(self._running):
            self._fail(sequence, error)
        for item in pending:
            item.emit(error)
        self._publish_state()

    def _publish_state(self) -> None:
        if self._on_state is not None:
            self._on_state(*self.stats())


def _timeout_error(request: GenerationRequest) -> ErrorEvent:
    return ErrorEvent(f"generation took longer than the {request.timeout:g} s request timeout", "timeout")
