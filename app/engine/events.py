"""What the engine tells its callers: one typed event per generated token, or one error.

API adapters render these into their own wire formats; nothing here knows about HTTP.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # the token budget (max_new_tokens) is spent
    EOS_TOKEN = "eos_token"  # the model ended the sequence
    STOP_SEQUENCE = "stop_sequence"  # the text reached one of the request's stop strings


class ErrorKind(enum.StrEnum):
    GENERATION = "generation"  # the model or the sampler failed
    TIMEOUT = "timeout"  # the request outlived its timeout
    UNAVAILABLE = "unavailable"  # the engine is shutting down


@dataclass
class Finish:
    """How a sequence ended; all times are seconds from its arrival."""

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    queue_seconds: float
    first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the model's raw logits."""

    id: int
    text: str  # the token decoded alone
    logprob: float
    special: bool


@dataclass
class TokenEvent:
    index: int
    id: int
    text: str  # this token's text (TGI's `token.text`)
    visible_text: str  # text that became safe to show, stop sequences considered
    logprob: float  # log-softmax of the raw logits: before penalty, temperature and filters
    special: bool
    finish: Finish | None = None  # set on the sequence's last token
    top_logprobs: list[TokenLogprob] = field(default_factory=list)  # the request's top_logprobs, best first


@dataclass(frozen=True)
class PromptToken:
    id: int
    text: str  # the token decoded alone
    logprob: float | None  # given the tokens before it; None for the first, which nothing predicts
    special: bool
    top_logprobs: list[TokenLogprob]  # the most likely tokens at its position, best first (empty for the first)


@dataclass
class PromptEvent:
    """The prompt's tokens with their log-probs, before the first `TokenEvent`.

    Sent when the request asks for prompt log-probs (`tokens` filled) or generates no
    token at all (`max_new_tokens` 0: then `finish` is set and no `TokenEvent` follows).
    """

    tokens: list[PromptToken]
    finish: Finish | None = None


@dataclass
class Generation:
    """A whole non-streamed generation: what its caller awaits."""

    prompt: PromptEvent | None
    tokens: list[TokenEvent]
    finish: Finish


@dataclass
class ErrorEvent:
    message: str
    kind: ErrorKind = ErrorKind.GENERATION


Event = TokenEvent | PromptEvent | ErrorEvent
