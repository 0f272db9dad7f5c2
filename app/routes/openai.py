"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from app.deps import ApiKey, Service
from app.openai_schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from app.routes.common import ERROR_RESPONSES, event_stream_doc, sse_response, until_disconnected
from app.service import STREAM_END

router = APIRouter(prefix="/v1", dependencies=[ApiKey], tags=["openai"])

STREAMED = "With `stream: true`, Server-Sent Events of chunks, then `data: [DONE]`."


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def models(service: Service) -> ModelList:
    """The served model."""
    return service.models()


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=event_stream_doc(f"The completion. {STREAMED}", CompletionResponse, done=STREAM_END),
)
async def completions(
    body: CompletionRequest, service: Service, request: Request
) -> CompletionResponse | EventSourceResponse:
    """Complete raw text (OpenAI's completions API)."""
    if body.stream:
        return sse_response(service.completion_stream(body))
    return await until_disconnected(request, service.completion(body))


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=event_stream_doc(f"The assistant's reply. {STREAMED}", ChatCompletionChunk, done=STREAM_END),
)
async def chat_completions(
    body: ChatCompletionRequest, service: Service, request: Request
) -> ChatCompletionResponse | EventSourceResponse:
    """Answer a conversation, formatted with the model's chat template."""
    if body.stream:
        return sse_response(service.chat_completion_stream(body))
    return await until_disconnected(request, service.chat_completion(body))
