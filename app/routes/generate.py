"""POST /generate: TGI-compatible text completion."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ApiKey, Service
from app.schemas import ErrorBody, GenerateRequest, GenerateResponse

router = APIRouter(dependencies=[ApiKey], tags=["generation"])

ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (401, 422, 429, 500, 503)}


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True, responses=ERROR_RESPONSES)
async def generate(body: GenerateRequest, service: Service) -> GenerateResponse:
    """Complete the raw text in `inputs` (no chat template)."""
    return await service.generate(body)
