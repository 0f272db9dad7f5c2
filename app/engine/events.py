"""What the engine tells its callers: one typed event per generated token, or one error.

API adapters render these into their own wire formats; nothing here knows about HTTP.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


@dataclass
class TokenEvent:
    index: int
    id: int
    text: str  # this token's text (TGI's `token.text`)
    visible_text: str  # text that became safe to show, stop sequences considered
    logprob: float
    special: bool
    finish: Finish | None = None  # set on the sequence's last token


@dataclass
class ErrorEvent:
    message: str
    kind: ErrorKind = ErrorKind.GENERATION


Event = TokenEvent | ErrorEvent
