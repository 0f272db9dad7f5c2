"""What the generation routes share: Server-Sent Events, and dropping the work of a client that left."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from app.errors import ClientDisconnectedError
from app.schemas import ErrorBody

T = TypeVar("T")
log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 422, 429, 500, 503, 504)
}


def event_stream_doc(
    description: str, *events: type[BaseModel], done: str | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entry of a route that answers 200 with Server-Sent Events.

    Each event's `data` is one of `events` as JSON (an error event is `ErrorBody`), or the `done` sentinel.
    """
    payload = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_inline_schema(e) for e in (*events, ErrorBody)]},
    }
    data = payload if done is None else {"anyOf": [{"const": done}, payload]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {
        200: {"description": description, "content": {"text/event-stream": {"schema": event}}},
        **ERROR_RESPONSES,
    }


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` substituted, to stand alone inside the OpenAPI document."""
    schema = model.model_json_schema(mode="serialization")
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


class _StallGuardedEventSource(EventSourceResponse):
    """An SSE response whose send gives up after `send_timeout` s on a client that reads nothing.

    The engine never waits for a client (its events queue up on the loop), but a stalled
    client's sequence would hold its batch slot to the end: giving up closes the payload
    iterator, which cancels the generation.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.warning(
                "%s: the client read nothing for %g s (QS_STREAM_STALL_TIMEOUT); its generation is cancelled",
                scope.get("path"),
                self.send_timeout,
            )


def sse_response(payloads: AsyncIterator[str], stall_timeout: float) -> EventSourceResponse:
    """One `data:` event per payload. A client that disconnects, or reads nothing for `stall_timeout`
    seconds, cancels the iteration, and so the generation."""
    return _StallGuardedEventSource(payloads, sep="\n", ping=15, send_timeout=stall_timeout)


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work` (a non-streamed generation), cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the client left first: its generation leaves the batch
            task.cancel()
            await asyncio.wait((task,))
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once done; covers this coroutine being cancelled itself
    if task.cancelled():
        raise ClientDisconnectedError("the client disconnected before the answer")
    return task.result()


async def _disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
