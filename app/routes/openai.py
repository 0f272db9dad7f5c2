"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from app.api.openai import STREAM_END
from app.deps import ApiKey, OpenAI
from app.openai_schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from app.routes.common import ERROR_RESPONSES, event_stream_doc, sse_response, until_disconnected

router = APIRouter(prefix="/v1", dependencies=[ApiKey], tags=["openai"])

STREAMED = "With `stream: true`, Server-Sent Events of chunks, then `data: [DONE]`."


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def models(api: OpenAI) -> ModelList:
    """The served model."""
    return api.models()


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=event_stream_doc(f"The completion. {STREAMED}", CompletionResponse, done=STREAM_END),
)
async def completions(
    body: CompletionRequest, api: OpenAI, request: Request
) -> CompletionResponse | EventSourceResponse:
    """Complete raw text (OpenAI's completions API)."""
    if body.stream:
        return sse_response(await api.completion_stream(body), api.service.settings.stream_stall_timeout)
    return await until_disconnected(request, api.completion(body))


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=event_stream_doc(f"The assistant's reply. {STREAMED}", ChatCompletionChunk, done=STREAM_END),
)
async def chat_completions(
    body: ChatCompletionRequest, api: OpenAI, request: Request
) -> ChatCompletionResponse | EventSourceResponse:
    """Answer a conversation, formatted with the model's chat template."""
    if body.stream:
        return sse_response(await api.chat_completion_stream(body), api.service.settings.stream_stall_timeout)
    return await until_disconnected(request, api.chat_completion(body))
