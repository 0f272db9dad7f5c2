"""OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models): requests mapped to `SamplingParams`,
responses and stream chunks in OpenAI's shapes."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from app.api.streaming import render
from app.engine.engine import EventStream
from app.engine.events import Finish, FinishReason, TokenEvent
from app.engine.sampling import SamplingParams
from app.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIFinishReason,
    SamplingFields,
    Usage,
)
from app.service import ModelService

STREAM_END = "[DONE]"  # OpenAI's last Server-Sent Event
FINISH_REASONS: dict[FinishReason, OpenAIFinishReason] = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def sampling_params(body: SamplingFields, max_new_tokens: int) -> SamplingParams:
    # OpenAI samples at temperature 1 unless told otherwise; temperature 0 is greedy.
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        do_sample=True,
        seed=body.seed,
        stop=body.stop_sequences,
        ignore_eos=body.ignore_eos,
    )


class OpenAIApi:
    def __init__(self, service: ModelService) -> None:
        self.service = service

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.service.model_name, created=self.service.started_at)])

    def _head(self, prefix: str) -> dict[str, Any]:
        """The fields every response and chunk of one request shares."""
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.service.model_name}

    # --- /v1/completions ------------------------------------------------------
    async def _open_completion(self, body: CompletionRequest) -> list[EventStream]:
        prompts = [await self.service.tokenize(p) for p in body.prompts]
        max_tokens = body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        return self.service.open(prompts, sampling_params(body, max_tokens))

    async def completion(self, body: CompletionRequest) -> CompletionResponse:
        finishes = await self.service.results(await self._open_completion(body))
        choices = [
            CompletionChoice(
                index=i,
                text=(prompt if body.echo else "") + f.generated_text,
                finish_reason=FINISH_REASONS[f.finish_reason],
            )
            for i, (prompt, f) in enumerate(zip(body.prompts, finishes, strict=True))
        ]
        return CompletionResponse(**self._head("cmpl"), choices=choices, usage=usage(finishes))

    async def completion_stream(self, body: CompletionRequest) -> AsyncIterator[str]:
        streams = await self._open_completion(body)
        return render(streams, _CompletionChunks(body, self._head("cmpl")), done=STREAM_END)

    # --- /v1/chat/completions -------------------------------------------------
    async def _open_chat(self, body: ChatCompletionRequest) -> list[EventStream]:
        # "developer" is the newer name of "system"; chat templates know only the latter.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        prompt_ids = await self.service.chat_prompt_ids(messages)
        budget = body.token_budget or max(self.service.settings.max_total_tokens - len(prompt_ids), 1)
        return self.service.open([prompt_ids], sampling_params(body, budget))

    async def chat_completion(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        [finish] = await self.service.results(await self._open_chat(body))
        choice = ChatChoice(
            index=0,
            message=AssistantMessage(content=finish.generated_text),
            finish_reason=FINISH_REASONS[finish.finish_reason],
        )
        return ChatCompletionResponse(**self._head("chatcmpl"), choices=[choice], usage=usage([finish]))

    async def chat_completion_stream(self, body: ChatCompletionRequest) -> AsyncIterator[str]:
        streams = await self._open_chat(body)
        return render(streams, _ChatChunks(body, self._head("chatcmpl")), done=STREAM_END)


def usage(finishes: list[Finish]) -> Usage:
    prompt = sum(f.prompt_tokens for f in finishes)
    completion = sum(f.generated_tokens for f in finishes)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _CompletionChunks:
    """Text chunks per prompt (echoed prompts first); the usage chunk last when asked."""

    def __init__(self, body: CompletionRequest, head: dict[str, Any]) -> None:
        self.body, self.head = body, head

    def _chunk(self, index: int, text: str, reason: OpenAIFinishReason | None = None) -> str:
        choice = CompletionChoice(index=index, text=text, finish_reason=reason)
        return CompletionResponse(**self.head, choices=[choice]).model_dump_json()

    def opening(self) -> list[str]:
        return [self._chunk(i, prompt) for i, prompt in enumerate(self.body.prompts)] if self.body.echo else []

    def token(self, index: int, event: TokenEvent) -> list[str]:
        if event.finish is not None:
            return [self._chunk(index, event.visible_text, FINISH_REASONS[event.finish.finish_reason])]
        return [self._chunk(index, event.visible_text)] if event.visible_text else []

    def closing(self, finishes: list[Finish]) -> list[str]:
        if not self.body.include_usage:
            return []
        return [CompletionResponse(**self.head, choices=[], usage=usage(finishes)).model_dump_json()]


class _ChatChunks:
    """The assistant's role first, then content deltas, a finish chunk, and the usage chunk when asked."""

    def __init__(self, body: ChatCompletionRequest, head: dict[str, Any]) -> None:
        self.body, self.head = body, head

    def _chunk(self, delta: ChatDelta, reason: OpenAIFinishReason | None = None) -> str:
        choice = ChatChunkChoice(index=0, delta=delta, finish_reason=reason)
        return ChatCompletionChunk(**self.head, choices=[choice]).model_dump_json()

    def opening(self) -> list[str]:
        return [self._chunk(ChatDelta(role="assistant", content=""))]

    def token(self, index: int, event: TokenEvent) -> list[str]:
        payloads = [self._chunk(ChatDelta(content=event.visible_text))] if event.visible_text else []
        if event.finish is not None:
            payloads.append(self._chunk(ChatDelta(), FINISH_REASONS[event.finish.finish_reason]))
        return payloads

    def closing(self, finishes: list[Finish]) -> list[str]:
        if not self.body.include_usage:
            return []
        return [ChatCompletionChunk(**self.head, choices=[], usage=usage(finishes)).model_dump_json()]
