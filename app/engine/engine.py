"""The generation engine: one worker thread owns the model; asyncio callers stream events.

The worker takes requests from a queue and runs them one after another
(prefill, then decode until a stop condition). Events travel back to the
caller's event loop through `call_soon_threadsafe`, so the loop never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.runner import ModelRunner
from app.engine.sampling import SamplingParams, choose_token

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class TokenEvent:
    index: int
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class FinishEvent:
    generated_text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    queue_seconds: float
    first_token_seconds: float | None


@dataclass
class ErrorEvent:
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent
Emit = Callable[[Event], None]
_SHUTDOWN = object()


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Any, eos_token_ids: set[int], device: torch.device) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.device = device
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_SHUTDOWN)
        self._thread.join(timeout=10)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Submit `request` and yield its events; leaving early cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        self._queue.put((request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e)))
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, FinishEvent | ErrorEvent):
                    return
        finally:
            request.cancelled.set()

    def run_blocking(self, request: GenerationRequest) -> list[Event]:
        """Run one request on the calling thread (warm-up before the worker starts)."""
        out: list[Event] = []
        self._run(request, out.append)
        return out

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _SHUTDOWN:
                return
            request, emit = item
            if request.cancelled.is_set():
                continue
            try:
                self._run(request, emit)
            except Exception as error:
                log.exception("generation failed: %s", error)
                emit(ErrorEvent("generation failed"))

    def _run(self, request: GenerationRequest, emit: Emit) -> None:
        params = request.params
        started = time.perf_counter()
        seed = params.seed
        generator = None
        if params.sampling:
            seed = seed if seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        seen = torch.tensor(request.prompt_ids, dtype=torch.long, device=self.device)
        detok = IncrementalDetokenizer(self.tokenizer)
        text = ""
        finish_reason = "length"
        first_token_at = None
        slot = 0
        generated = 0
        try:
            logits = self.runner.prefill(slot, request.prompt_ids)
            while generated < params.max_new_tokens and not request.cancelled.is_set():
                token, logprob = choose_token(logits, params, generator, seen)
                generated += 1
                first_token_at = first_token_at or time.perf_counter()
                seen = torch.cat((seen, torch.tensor([token], device=self.device)))
                if token in self.eos_token_ids:
                    emit(TokenEvent(generated - 1, token, "", logprob, True))
                    finish_reason = "eos_token"
                    break
                delta = detok.push(token)
                text, stopped = _apply_stop(text, delta, params.stop)
                emit(TokenEvent(generated - 1, token, delta, logprob, token in self._special_ids))
                if stopped:
                    finish_reason = "stop_sequence"
                    break
                if generated < params.max_new_tokens:
                    logits = self.runner.decode([slot], [token])[0]
        finally:
            self.runner.release(slot)
        emit(
            FinishEvent(
                generated_text=text,
                finish_reason=finish_reason,
                generated_tokens=generated,
                prompt_tokens=len(request.prompt_ids),
                seed=seed,
                queue_seconds=started - request.enqueued_at,
                first_token_seconds=None if first_token_at is None else first_token_at - request.enqueued_at,
            )
        )


def _apply_stop(text: str, delta: str, stops: list[str]) -> tuple[str, bool]:
    """Append `delta`; if a stop sequence now appears, cut the text before it."""
    new_text = text + delta
    for stop in stops:
        # only the tail can contain a stop sequence that was not there before
        start = max(0, len(text) - len(stop) + 1)
        index = new_text.find(stop, start)
        if index != -1:
            return new_text[:index], True
    return new_text, False
