"""Health, info and metrics: open even when an API key is set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import Service
from app.schemas import HealthBody

router = APIRouter(tags=["service"])


@router.get("/health", response_model=HealthBody, responses={503: {"model": HealthBody}})
async def health(service: Service) -> JSONResponse:  # async: answered on the loop, no thread-pool hop
    """200 once the model is loaded and warmed up; 503 while loading or after a failed load."""
    body = HealthBody(status=service.state.value, detail=service.failure)
    status = 200 if body.status == "ready" else 503
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


@router.get("/info")
def info(service: Service) -> dict[str, Any]:
    """Model, precision mode, backend, device, weight bytes and limits."""
    return service.info()


@router.get("/metrics", include_in_schema=False)
def metrics(service: Service) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
