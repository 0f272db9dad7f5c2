"""A pure ASGI middleware that bounds request bodies before anything parses them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class PayloadTooLarge(HTTPException):
    """The body is over QS_MAX_REQUEST_BYTES; a FastAPI HTTPException, which its body reader re-raises (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than QS_MAX_REQUEST_BYTES ({limit} bytes)")


class BodySizeLimit:
    """Refuse a body over `max_bytes` with 413, counting bytes as they arrive from `receive`.

    A declared `Content-Length` over the limit is refused at the first read, before any byte of
    the body is taken; a chunked body (no length) at the read that crosses the limit. Routes that
    read no body are not affected.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[Any], int | None]) -> None:
        """`max_bytes(asgi_app)` gives the limit per request (None: none), so settings read at start-up apply."""
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_bytes(scope.get("app")) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise PayloadTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, counted_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None
