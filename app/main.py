"""The ASGI app (`app.main:app`) and the `quantserve` console script.

The console script drains on SIGTERM/SIGINT (`DrainingServer`): the port stays open,
/health answers 503 `draining`, new generations get 503, running and queued ones finish
for up to QS_SHUTDOWN_TIMEOUT, the rest end with an error, and the process exits 0.
Under plain `uvicorn app.main:app`, uvicorn's own signal handling applies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request, Response

import app as package
from app.errors import error_response, install_error_handlers
from app.middleware import BodySizeLimit
from app.routes import generate, health, openai
from app.service import ModelService, State
from app.settings import Settings, SettingsError, get_settings, load_settings

log = logging.getLogger("app")
# After the drain, seconds uvicorn gives open responses to be written out before it cancels them.
RESPONSE_FLUSH_SECONDS = 5.0


def create_app(settings: Settings | None = None, loader=None, *, exit_on_load_failure: bool = True) -> FastAPI:
    """Build the app. Settings are read at start-up (lifespan) unless given.

    With `exit_on_load_failure`, a failed load stops the server: through
    `app.state.stop_server` when the console script set it, else by SIGTERM.
    """

    @asynccontextmanager
    async def lifespan(fastapi_app: FastAPI) -> AsyncIterator[None]:
        try:
            resolved = settings or get_settings()
        except SettingsError as error:
            log.error("%s", error)
            raise
        service = ModelService(resolved, loader) if loader else ModelService(resolved)
        fastapi_app.state.service = service
        # Load in the background so /health can answer 503 while the model loads.
        stop = getattr(fastapi_app.state, "stop_server", None) or _terminate_self
        threading.Thread(
            target=_load, args=(service, stop if exit_on_load_failure else None), name="model-loader", daemon=True
        ).start()
        yield
        service.shutdown()

    fastapi_app = FastAPI(
        title="quantserve",
        version=package.__version__,
        description="Serve one LLM in a chosen precision mode, with metrics labelled by mode.",
        lifespan=lifespan,
    )
    install_error_handlers(fastapi_app)
    fastapi_app.include_router(generate.router)
    fastapi_app.include_router(openai.router)
    fastapi_app.include_router(health.router)

    # Before any parser reads a body. Inside `observe` (added after it, so outer): that middleware reads
    # the body in a task group, which would wrap the 413 in an exception group.
    fastapi_app.add_middleware(BodySizeLimit, max_bytes=_max_request_bytes)

    @fastapi_app.middleware("http")
    async def observe(request: Request, call_next) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as error:
            log.error("%s %s -> 500: %s: %s", request.method, request.url.path, type(error).__name__, error)
            response = error_response(request, 500, "internal server error", "internal")
        service: ModelService | None = getattr(request.app.state, "service", None)
        route = request.scope.get("route")
        if service is not None and route is not None and request.url.path != "/metrics":
            service.metrics.observe_request(
                route.path,
                response.status_code,
                getattr(request.state, "error_type", "none"),
                time.perf_counter() - started,
                getattr(request.state, "precision", None),
            )
        return response

    return fastapi_app


def _max_request_bytes(served: FastAPI) -> int | None:
    """QS_MAX_REQUEST_BYTES of the settings the lifespan resolved (None before it ran)."""
    service: ModelService | None = getattr(served.state, "service", None)
    return service.settings.max_request_bytes if service is not None else None


def _load(service: ModelService, stop_server: Callable[[], None] | None) -> None:
    service.load()
    if service.state is State.FAILED and stop_server is not None:
        stop_server()


def _terminate_self() -> None:
    # Under plain `uvicorn app.main:app` we hold no server handle; SIGTERM stops it (non-zero exit).
    os.kill(os.getpid(), signal.SIGTERM)


app = create_app()


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT drain the service before the listening socket closes.

    uvicorn's own handler stops accepting at once and re-raises the signal at exit; here the
    first signal starts `ModelService.drain` (the port stays open, /health says `draining`),
    a second one cuts the drain short, and the server exits (status 0) once the drain is over.
    """

    def __init__(self, config: uvicorn.Config, served: FastAPI, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.served = served
        self.shutdown_timeout = shutdown_timeout
        self._drain: asyncio.Task[None] | None = None
        self._cut_short: asyncio.Event | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler interrupts whatever the loop runs: hand the work to the loop.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (not serving yet or any more): nothing to drain
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name)

    def _on_signal(self, name: str) -> None:
        if self._drain is not None:
            log.warning("%s again: the drain is cut short", name)
            assert self._cut_short is not None
            self._cut_short.set()
            return
        log.info("%s: draining for up to %g s (QS_SHUTDOWN_TIMEOUT)", name, self.shutdown_timeout)
        self._cut_short = asyncio.Event()
        self._drain = asyncio.create_task(self._drain_then_exit(self._cut_short))

    async def _drain_then_exit(self, cut_short: asyncio.Event) -> None:
        try:
            service: ModelService | None = getattr(self.served.state, "service", None)
            if service is not None:
                await service.drain(self.shutdown_timeout, cut_short)
        finally:
            self.should_exit = True


def main() -> None:
    """Console script: validate settings before anything heavy, then serve."""
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"quantserve: {error}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    served = create_app(settings)
    config = uvicorn.Config(
        served,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=RESPONSE_FLUSH_SECONDS,
    )
    server = DrainingServer(config, served, settings.shutdown_timeout)
    served.state.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    service: ModelService | None = getattr(served.state, "service", None)
    if service is not None and service.state is State.FAILED:
        sys.exit(1)


if __name__ == "__main__":
    main()
