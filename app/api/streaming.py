"""The one streaming loop every API shares: merge the prompts' event streams and render each event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from app.engine.engine import EventStream
from app.engine.events import ErrorEvent, Event, Finish, PromptEvent, TokenEvent
from app.schemas import ErrorBody

log = logging.getLogger(__name__)


class EventRenderer(Protocol):
    """One API's Server-Sent Event payloads (JSON strings) for a request's events."""

    def opening(self) -> list[str]:
        """Payloads before the first token."""
        ...

    def prompt(self, index: int, event: PromptEvent) -> list[str]:
        """Payloads for prompt `index`'s own tokens (their log-probs), before its first generated token;
        `event.finish` is set when nothing is generated."""
        ...

    def token(self, index: int, event: TokenEvent) -> list[str]:
        """Payloads for one token of prompt `index`; `event.finish` is set on that prompt's last one."""
        ...

    def closing(self, finishes: list[Finish]) -> list[str]:
        """Payloads once every prompt finished without error (e.g. usage)."""
        ...


async def render(streams: list[EventStream], renderer: EventRenderer, done: str | None = None) -> AsyncIterator[str]:
    """Render the streams' events as they come; an error ends the stream as one error payload.

    `done` (OpenAI's `[DONE]`) is sent last, after an error too. Leaving the loop early
    (the client disconnected) closes every stream, which cancels its generation.
    """
    try:
        for payload in renderer.opening():
            yield payload
        finishes: list[Finish] = []
        async for index, event in _merged(streams):
            if isinstance(event, ErrorEvent):
                yield error_payload(event)
                break
            if event.finish is not None:
                finishes.append(event.finish)
            payloads = renderer.prompt(index, event) if isinstance(event, PromptEvent) else renderer.token(index, event)
            for payload in payloads:
                yield payload
        else:
            for payload in renderer.closing(finishes):
                yield payload
        if done is not None:
            yield done
    finally:
        for stream in streams:
            stream.close()


def error_payload(event: ErrorEvent) -> str:
    """An error after the stream started: sent as an event, in the one error shape."""
    log.warning("generation failed mid-stream: %s: %s", event.kind, event.message)
    return ErrorBody(error=event.message, error_type=event.kind.value).model_dump_json()


async def _merged(streams: list[EventStream]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several streams as they come, each with its stream's index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    arrivals: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, stream: EventStream) -> None:
        async for event in stream:
            arrivals.put_nowait((index, event))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            index, event = await arrivals.get()
            live -= isinstance(event, ErrorEvent) or event.finish is not None
            yield index, event
    finally:
        for task in pumps:
            task.cancel()
