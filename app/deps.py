"""Dependencies shared by the routers (FastAPI `Annotated` style).

All `async def`: FastAPI runs a plain `def` dependency on its thread pool, a thread hop per
dependency per request that, under load, costs the event loop more than the request itself.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.openai import OpenAIApi
from app.api.tgi import TgiApi
from app.errors import UnauthorizedError
from app.service import ModelService

_bearer = HTTPBearer(auto_error=False)


async def get_service(request: Request) -> ModelService:
    return request.app.state.service


Service = Annotated[ModelService, Depends(get_service)]


def _label_request(request: Request) -> Callable[[str], None]:
    """What the adapters call with the mode a request picked: the request metrics are labelled with it."""

    def note(precision: str) -> None:
        request.state.precision = precision

    return note


async def get_tgi(service: Service, request: Request) -> TgiApi:
    return TgiApi(service, _label_request(request))


async def get_openai(service: Service, request: Request) -> OpenAIApi:
    return OpenAIApi(service, _label_request(request))


Tgi = Annotated[TgiApi, Depends(get_tgi)]
OpenAI = Annotated[OpenAIApi, Depends(get_openai)]


async def require_api_key(
    service: Service,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """When QS_API_KEY is set, generation routes need `Authorization: Bearer <key>`."""
    expected = service.settings.api_key
    if expected is None:
        return
    given = credentials.credentials if credentials else ""
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise UnauthorizedError("missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


ApiKey = Depends(require_api_key)
