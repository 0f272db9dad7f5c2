"""One error shape everywhere: `{"error": str, "error_type": str}`; no stack trace reaches a client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with an HTTP status and a stable `error_type` for clients and metrics."""

    status_code = 500
    error_type = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class InputValidationError(ServiceError):
    status_code = 422
    error_type = "validation"


class OverloadedError(ServiceError):
    status_code = 429
    error_type = "overloaded"


class UnauthorizedError(ServiceError):
    status_code = 401
    error_type = "unauthorized"


class UnavailableError(ServiceError):
    status_code = 503
    error_type = "unavailable"


class GenerationError(ServiceError):
    status_code = 500
    error_type = "generation"


class RequestTimeoutError(ServiceError):
    """The generation ran past QS_REQUEST_TIMEOUT."""

    status_code = 504
    error_type = "timeout"


class ClientDisconnectedError(ServiceError):
    """The client went away before the answer; nobody reads this response (499, as nginx logs it)."""

    status_code = 499
    error_type = "client_closed"


_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_response(request: Request, status: int, message: str, error_type: str, headers=None) -> JSONResponse:
    request.state.error_type = error_type  # read by the metrics middleware
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for item in exc.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code, exc.error_type, exc)
        return error_response(request, exc.status_code, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, _describe_validation(exc), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http")
        return error_response(request, exc.status_code, str(exc.detail), error_type, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s -> 500: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(request, 500, "internal server error", "internal")
