"""The generation engine: one worker thread owns the model; asyncio callers stream events.

Each `step` joins three parts: the scheduler (`scheduler.py`) drops cancelled
and expired sequences and admits waiting requests into free slots; the runner
prefills the admitted prompts and decodes every running sequence together;
the output processor (`output.py`) turns each row of logits into a
`TokenEvent`, and a sequence that ends leaves the batch, freeing its slot,
before its last event goes out.

With a `FairShare` (several modes, or a shadow scorer), the worker waits for its turn and hands
each step to the share's compute thread, where every engine's steps run: one thread runs torch.

Events travel back to the caller's event loop through `call_soon_threadsafe`,
so the loop never waits on the model, and the model never waits on a client.

A runner that raises (or a worker thread that dies) is an engine fault: the model's
state is unknown, so every running and waiting request gets an error at once and the
engine takes no more (`failure` says why; `on_fault` is told). A problem of one
sequence (NaN logits, a sampling error) fails that sequence alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from app.engine.events import (
    ErrorEvent,
    ErrorKind,
    Event,
    Finish,
    FinishReason,
    Generation,
    PromptEvent,
    PromptToken,
    TokenEvent,
    TokenLogprob,
)
from app.engine.fair_share import FairShare
from app.engine.output import OutputProcessor, SamplingFailed, SequenceState
from app.engine.runner import ModelRunner
from app.engine.scheduler import Emit, EngineOverloaded, EngineStopped, GenerationRequest, Scheduler, Ticket

__all__ = [
    "BatchCallback",
    "Emit",
    "Engine",
    "EngineOverloaded",
    "EngineStopped",
    "ErrorEvent",
    "ErrorKind",
    "Event",
    "EventStream",
    "FaultCallback",
    "Finish",
    "FinishCallback",
    "FinishReason",
    "Generation",
    "GenerationRequest",
    "PromptEvent",
    "PromptToken",
    "ReplayCallback",
    "StateCallback",
    "TokenEvent",
    "TokenLogprob",
]

log = logging.getLogger(__name__)

StateCallback = Callable[[int, int], None]  # (running, waiting)
BatchCallback = Callable[[int], None]  # sequences in a decode step
FinishCallback = Callable[[Finish], None]  # a sequence ended normally
FaultCallback = Callable[[str], None]  # the engine failed; the argument says why
# a request that kept its logits ended: (prompt ids, generated ids, the logits each was chosen from [n, vocab])
ReplayCallback = Callable[[list[int], list[int], torch.Tensor], None]

ENGINE_FAILED = "generation failed: the engine stopped (the server log says why)"


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
        on_finish: FinishCallback | None = None,
        on_fault: FaultCallback | None = None,
        on_replay: ReplayCallback | None = None,
        share: FairShare | None = None,
        name: str = "engine",
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._on_state = on_state
        self._on_batch = on_batch
        self._on_finish = on_finish
        self._on_fault = on_fault
        self._on_replay = on_replay
        self._share = share  # the CPU shared with other engines: a step runs only in this engine's turn
        self.name = name
        self.failure: str | None = None  # set once when the engine fails; it then takes no more requests
        self._scheduler = Scheduler(max_batch_size, max_queue, release=self._release)
        self._output = OutputProcessor(tokenizer, eos_token_ids, device)
        self._states: dict[int, SequenceState] = {}  # slot -> output state of its running sequence (the worker's)
        self._thread = threading.Thread(target=self._work, name=f"engine-worker-{name}", daemon=True)

    @property
    def eos_token_ids(self) -> set[int]:
        return self._output.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: set[int]) -> None:
        self._output.eos_token_ids = ids

    # --- callers' side -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Refuse new requests; the worker ends what is left with an `unavailable` error. Does not wait."""
        self._scheduler.stop()

    def stop(self) -> None:
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest, emit: Emit) -> None:
        """Queue a request; `emit` gets its events on the worker thread. Thread-safe."""
        self._scheduler.submit(request, emit)
        self._publish_state()

    def open_stream(self, request: GenerationRequest) -> EventStream:
        """Submit from a coroutine; iterate the returned stream for the events."""
        stream = EventStream(self, request, asyncio.get_running_loop())
        self.submit(request, stream.emitter())
        return stream

    def cancel(self, request: GenerationRequest) -> None:
        """Drop a request: at once if it still waits, else at the start of the next step."""
        self._scheduler.cancel(request)
        self._publish_state()

    def stats(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return self._scheduler.stats()

    def is_full(self) -> bool:
        """Whether a request submitted now would get EngineOverloaded (a hint, to refuse before tokenizing)."""
        return self._scheduler.is_full()

    def run_until_idle(self) -> None:
        """Step on the calling thread until every submitted request ended (warm-up and tests, before `start`)."""
        if self._thread.is_alive():
            raise RuntimeError("the worker thread owns the model")
        while self._scheduler.has_work():
            self.step()

    def run_blocking(self, request: GenerationRequest) -> list[Event]:
        """Run one request to its end on the calling thread (before `start`)."""
        events: list[Event] = []
        self.submit(request, events.append)
        self.run_until_idle()
        return events

    # --- the worker ----------------------------------------------------------
    def step(self) -> None:
        """Schedule, execute, process outputs: one decode step of the batch. On the model's thread only.

        An exception here is an engine fault: every request gets an error, and the engine stops.
        """
        try:
            self._step()
        except Exception as error:
            self._fault(error)

    def _step(self) -> None:
        for ticket in self._scheduler.drop(time.perf_counter()):
            ticket.emit(_timeout_error(ticket.request))
        admitted = self._scheduler.admit()
        for ticket in admitted:
            self._states[ticket.slot] = self._output.open(ticket.request, ticket.admitted_at)
        for ticket in admitted:  # each prompt gets its first token before the next one is prefilled
            self._prefill(ticket)
        batch = self._scheduler.running
        if batch:
            self._decode(batch)
        self._publish_state()

    def _work(self) -> None:
        try:
            while self._scheduler.wait_for_work():
                if self._share is None:  # the only party: the step runs on this thread
                    self.step()
                else:  # in its turn, on the share's one compute thread
                    self._share.run(self.name, self.step)
        except BaseException as error:  # the worker dies: nobody may be left waiting for it
            self._fault(error)
            return
        self._abort_all()

    def _fault(self, error: BaseException) -> None:
        """The model failed: fail every running and waiting request at once, and take no more."""
        self.failure = f"{type(error).__name__}: {error}"
        log.error("engine failed: %s", self.failure, exc_info=error)
        self._scheduler.stop(ENGINE_FAILED)
        if self._on_fault is not None:  # first, so a client that sees its error finds the server failed
            try:
                self._on_fault(self.failure)
            except Exception:
                log.exception("on_fault callback failed")
        event = ErrorEvent(ENGINE_FAILED, ErrorKind.GENERATION)
        for ticket in self._scheduler.abort():
            ticket.emit(event)
        self._publish_state()

    def _prefill(self, ticket: Ticket) -> None:
        params = ticket.request.params
        # the logits of every prompt position only when its log-probs are asked: they cost a head matmul each
        all_positions = params.prompt_logprobs is not None
        # a runner that raises is an engine fault (_work): it fails every request, not this one alone
        logits = self.runner.prefill(ticket.slot, ticket.request.prompt_ids, all_positions=all_positions)
        if all_positions or params.max_new_tokens == 0:
            try:
                prompt = self._output.prompt(self._states[ticket.slot], logits if all_positions else None)
            except Exception as error:  # this sequence's problem: it fails alone
                log.warning("prompt log-probs of slot %d failed: %s", ticket.slot, error)
                self._fail(ticket, ErrorEvent(f"generation failed: {error}"))
                return
            self._deliver(ticket, prompt)
            if prompt.finish is not None:
                return
            logits = logits[-1]
        self._process(ticket, logits)

    def _decode(self, batch: list[Ticket]) -> None:
        states = [self._states[t.slot] for t in batch]
        logits = self.runner.decode([t.slot for t in batch], [s.last_token for s in states])
        if self._on_batch is not None:
            self._on_batch(len(batch))
        for ticket, row in zip(batch, logits, strict=True):
            self._process(ticket, row)

    def _process(self, ticket: Ticket, logits: torch.Tensor) -> None:
        """Turn the sequence's logits into its next event; retire the sequence first when that event ends it."""
        try:
            event = self._output.process(self._states[ticket.slot], logits)
        except SamplingFailed as error:  # this sequence's problem: it fails alone, the batch goes on
            log.warning("sequence in slot %d failed: %s", ticket.slot, error)
            self._fail(ticket, ErrorEvent(f"generation failed: {error}"))
            return
        self._deliver(ticket, event)

    def _deliver(self, ticket: Ticket, event: TokenEvent | PromptEvent) -> None:
        """Emit the sequence's event; when it ends the sequence, retire it and report the finish first."""
        if event.finish is not None:
            state = self._states.get(ticket.slot)
            # Retire first: by the time the caller sees the end, its slot is free for its next request.
            self._scheduler.retire(ticket)
            if state is not None and state.kept_tokens and self._on_replay is not None:
                try:
                    logits = self._output.kept_logits(state)
                    self._on_replay(list(ticket.request.prompt_ids), state.kept_tokens, logits)
                except Exception:  # a shadow replay is never the client's problem
                    log.exception("on_replay callback failed")
            if self._on_finish is not None:
                try:
                    self._on_finish(event.finish)
                except Exception:  # a failing observer must not keep the result from its caller
                    log.exception("on_finish callback failed")
        ticket.emit(event)

    def _fail(self, ticket: Ticket, error: ErrorEvent) -> None:
        self._scheduler.retire(ticket)
        ticket.emit(error)

    def _release(self, slot: int) -> None:
        """The scheduler frees `slot`: forget the sequence's KV cache and output state."""
        try:
            self.runner.release(slot)
        finally:
            self._states.pop(slot, None)

    def _abort_all(self) -> None:
        """On stop: tell everyone still waiting or running that the server goes away."""
        error = ErrorEvent("the server is shutting down", ErrorKind.UNAVAILABLE)
        for ticket in self._scheduler.abort():
            ticket.emit(error)
        self._publish_state()

    def _publish_state(self) -> None:
        if self._on_state is not None:
            self._on_state(*self.stats())


def _timeout_error(request: GenerationRequest) -> ErrorEvent:
    return ErrorEvent(f"generation took longer than the {request.timeout:g} s request timeout", ErrorKind.TIMEOUT)
