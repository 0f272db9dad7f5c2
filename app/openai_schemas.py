"""Request and response bodies of the OpenAI-compatible routes (/v1/...).

Only what this server does is declared; an unknown field is a 422, not silently
ignored. `top_k`, `repetition_penalty` and `ignore_eos` are extensions, as in vLLM.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from app.schemas import MAX_SEED, MAX_TOP_LOGPROBS, NonEmptyStr, StopStr, StrictModel

MAX_STOP_SEQUENCES = 4
MAX_PROMPTS = 16

OpenAIFinishReason = Literal["stop", "length"]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Request(StrictModel):
    model_config = ConfigDict(allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(
        None,
        description="`<model-id>:<mode>` picks a served precision mode (see /v1/models); any other name, "
        "or none, is answered by the default mode",
    )
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
    prompt: (
        NonEmptyStr
        | TokenIds
        | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description=f"a text or a list of token ids, or up to {MAX_PROMPTS} of either (one choice each)")
    max_tokens: int | None = Field(16, ge=0, description="0 (with `echo`) only scores the prompt")
    echo: bool = Field(False, description="put the prompt before the completion (with its log-probs when asked)")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="log-probs of each token (the raw logits' log-softmax) and of this many most likely ones",
    )

    @model_validator(mode="after")
    def _nothing_to_return(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it needs echo true (to score the prompt)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One text or token-id list per choice."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


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
    logprobs: bool = Field(False, description="each generated token's log-prob (the raw logits' log-softmax)")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with `logprobs`: this many most likely tokens at each step"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_echo(cls, data: Any) -> Any:
        if isinstance(data, dict) and "echo" in data:  # a clearer 422 than "extra inputs are not permitted"
            raise ValueError("echo is not supported by /v1/chat/completions; use /v1/completions")
        return data

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs true")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token, prompt tokens first with `echo`."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the prompt's first token")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="the `logprobs` most likely tokens and the chosen one; null for the prompt's first token"
    )
    text_offset: list[int] = Field(description="where each token starts in the choice's text")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the token's text as UTF-8")


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
