"""POST /generate and /generate_stream: TGI-compatible text completion."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from app.deps import ApiKey, Tgi
from app.routes.common import ERROR_RESPONSES, event_stream_doc, sse_response, until_disconnected
from app.schemas import GenerateRequest, GenerateResponse, StreamResponse

router = APIRouter(dependencies=[ApiKey], tags=["generation"])


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True, responses=ERROR_RESPONSES)
async def generate(body: GenerateRequest, tgi: Tgi, request: Request) -> GenerateResponse:
    """Complete the raw text in `inputs` (no chat template)."""
    return await until_disconnected(request, tgi.generate(body))


@router.post(
    "/generate_stream",
    response_class=EventSourceResponse,
    responses=event_stream_doc(
        "One event per token; the last carries `generated_text` (and `details` when asked). "
        "An error after the stream started comes as an event `{error, error_type}`.",
        StreamResponse,
    ),
)
async def generate_stream(body: GenerateRequest, tgi: Tgi) -> EventSourceResponse:
    """Like /generate, streamed as Server-Sent Events in TGI's shape."""
    return sse_response(await tgi.generate_stream(body), tgi.service.settings.stream_stall_timeout)
