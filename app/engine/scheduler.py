"""The scheduler: a waiting queue, batch slots, admission, expiry and cancellation.

Callers' threads submit and cancel; the worker thread drops ended sequences,
admits waiting requests into free slots and retires finished ones. It knows
nothing of models, tokens or tensors: a slot is a number, and freeing one
calls `release` (the runner forgets its KV cache there).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.engine.events import Event

if TYPE_CHECKING:
    from app.engine.sampling import SamplingParams

Emit = Callable[[Event], None]
Release = Callable[[int], None]


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
    keep_logits: bool = False  # keep each generated token's logits for a shadow replay (a sampled request)

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.enqueued_at > self.timeout


@dataclass(eq=False)
class Ticket:
    """One submitted request in the scheduler: waiting (slot -1), then running in a slot."""

    request: GenerationRequest
    emit: Emit
    slot: int = -1
    admitted_at: float = 0.0  # time.perf_counter() at admission; 0 while waiting


class Scheduler:
    """Admission control and slot bookkeeping for continuous batching.

    `submit`, `cancel`, `stats` and `stop` are thread-safe. `drop`, `admit`,
    `retire` and `abort` belong to the worker thread, which alone touches the
    running list and the free slots.
    """

    def __init__(self, max_batch_size: int, max_queue: int, release: Release | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._release = release
        # shared with the callers' threads, under _cond
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._in_flight = 0  # submitted and not yet ended: waiting + running
        self._stopping = False
        self._stop_reason = "the server is shutting down"
        # the worker's own
        self._running: list[Ticket] = []
        self._free_slots = list(range(max_batch_size - 1, -1, -1))  # popped from the end: slot 0 first

    # --- callers' side -------------------------------------------------------
    def submit(self, request: GenerationRequest, emit: Emit) -> Ticket:
        """Queue a request, or refuse it at once (EngineStopped, EngineOverloaded)."""
        with self._cond:
            if self._stopping:
                raise EngineStopped(self._stop_reason)
            if self._in_flight >= self.max_batch_size + self.max_queue:
                raise EngineOverloaded(
                    f"all {self.max_batch_size} batch slots are busy and {len(self._waiting)} requests wait; retry later"
                )
            ticket = Ticket(request, emit)
            self._waiting.append(ticket)
            self._in_flight += 1
            self._cond.notify()
        return ticket

    def cancel(self, request: GenerationRequest) -> None:
        """Mark a request cancelled: it leaves the queue at once, or its slot at the next `drop`."""
        request.cancelled.set()
        with self._cond:
            for ticket in self._waiting:
                if ticket.request is request:
                    self._waiting.remove(ticket)
                    self._in_flight -= 1
                    break

    def stats(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cond:
            return self._in_flight - len(self._waiting), len(self._waiting)

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests from now on (EngineStopped says `reason`) and wake the worker."""
        with self._cond:
            if not self._stopping:
                self._stopping, self._stop_reason = True, reason
            self._cond.notify()

    def is_full(self) -> bool:
        """Whether a request submitted now would be refused as overloaded (a hint: it may change at once)."""
        with self._cond:
            return self._in_flight >= self.max_batch_size + self.max_queue

    # --- the worker ------------------------------------------------------------
    @property
    def running(self) -> list[Ticket]:
        """The running sequences in admission order (a copy)."""
        return list(self._running)

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._running)

    def wait_for_work(self) -> bool:
        """Block until there is something to run (True) or the scheduler stops (False)."""
        with self._cond:
            while not (self._stopping or self._waiting or self._running):
                self._cond.wait()
            return not self._stopping

    def drop(self, now: float) -> list[Ticket]:
        """Retire cancelled and expired running sequences, unqueue expired waiting ones; return the expired.

        The expired running tickets come first, in admission order, then the waiting ones in arrival order.
        """
        expired = []
        for ticket in list(self._running):
            if ticket.request.cancelled.is_set():
                self.retire(ticket)
            elif ticket.request.expired(now):
                self.retire(ticket)
                expired.append(ticket)
        with self._cond:
            expired_waiting = [t for t in self._waiting if t.request.expired(now)]
            for ticket in expired_waiting:
                self._waiting.remove(ticket)
                self._in_flight -= 1
        return expired + expired_waiting

    def admit(self) -> list[Ticket]:
        """Move waiting requests, oldest first, into the free slots; return them, now running."""
        now = time.perf_counter()
        with self._cond:
            admitted = []
            while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                admitted.append(self._waiting.popleft())
        for ticket in admitted:
            ticket.slot = self._free_slots.pop()
            ticket.admitted_at = now
            self._running.append(ticket)
        return admitted

    def retire(self, ticket: Ticket) -> None:
        """A running sequence ended: release its slot (even when `release` fails) for the next admission."""
        self._running.remove(ticket)
        try:
            if self._release is not None:
                self._release(ticket.slot)
        finally:
            self._free_slots.append(ticket.slot)
            with self._cond:
                self._in_flight -= 1

    def abort(self) -> list[Ticket]:
        """Empty the scheduler: retire every running sequence and unqueue every waiting one; return them all."""
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._in_flight -= len(waiting)
        running = list(self._running)
        for ticket in running:
            # after an engine fault the runner may fail to release a slot: it is forgotten all the same
            with contextlib.suppress(Exception):
                self.retire(ticket)
        return running + waiting
