"""The ASGI app (`app.main:app`) and the `quantserve` console script."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

import app as package
from app.errors import error_response, install_error_handlers
from app.routes import generate, health, openai
from app.service import ModelService, State
from app.settings import Settings, SettingsError, get_settings, load_settings

log = logging.getLogger("app")


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
            )
        return response

    return fastapi_app


def _load(service: ModelService, stop_server: Callable[[], None] | None) -> None:
    service.load()
    if service.state is State.FAILED and stop_server is not None:
        stop_server()


def _terminate_self() -> None:
    # Under plain `uvicorn app.main:app` we hold no server handle; SIGTERM stops it (non-zero exit).
    os.kill(os.getpid(), signal.SIGTERM)


app = create_app()


def main() -> None:
    """Console script: validate settings before anything heavy, then serve."""
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"quantserve: {error}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    served = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(served, host=settings.host, port=settings.port, log_level=settings.log_level)
    )
    served.state.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    service: ModelService | None = getattr(served.state, "service", None)
    if service is not None and service.state is State.FAILED:
        sys.exit(1)


if __name__ == "__main__":
    main()
