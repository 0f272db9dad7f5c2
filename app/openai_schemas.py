"""Request and response bodies of the OpenAI-compatible routes (/v1/...).

Only what this server does is declared; an unknown field is a 422, not silently
ignored. `top_k`, `repetition_penalty` and `ignore_eos` are extensions, as in vLLM.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from app.schemas import MAX_SEED, NonEmptyStr, StopStr, StrictModel

MAX_STOP_SEQUENCES = 4
MAX_PROMPTS = 16

OpenAIFinishReason = Literal["stop", "length"]


class _Request(StrictModel):
    model_config = ConfigDict(allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="informational: the served model answers whatever is named")
    temperature: float | None = Field(None, ge=0, le=2, description="default 1 (sampling); 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="choices per prompt; only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0, ge=0, le=0, description="only 0 is supported; see repetition_penalty")
    frequency_penalty: float = Field(0, ge=0, le=0, description="only 0 is supported; see repetition_penalty")
    user: str | None = None
    top_k: int | None = Field(None, ge=0, description="extension: keep the k most likely tokens")
    repetition_penalty: float | None = Field(None, gt=0, description="extension: CTRL-style penalty")
    ignore_eos: bool = Field(False, description="extension: generate the full max_tokens (benchmarks)")

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"a text, or up to {MAX_PROMPTS} texts (one choice each)"
    )
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="put the prompt before the completion")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, description="default: as many as QS_MAX_TOTAL_TOKENS leaves")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (with `stream`) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: OpenAIFinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_given(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends only what changed: `{"role": ...}` first, then `{"content": ...}`, then `{}`.
        return {key: value for key, value in serialize(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quantserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
