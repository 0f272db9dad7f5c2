"""Request and response bodies (TGI's shapes for /generate)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**64 - 1  # torch.Generator takes 64-bit seeds
NonEmptyStr = Annotated[str, Field(min_length=1)]
MAX_STOP_CHARS = 256  # the stop matcher rescans a stop's length of tail per token: keep that bounded
StopStr = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StrictModel(BaseModel):
    """Request bodies: unknown fields and wrong JSON types (`"5"` for 5, `0` for false) are 422s."""

    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateParameters(StrictModel):
    max_new_tokens: int = Field(20, ge=1)
    temperature: float | None = Field(None, ge=0, description="0 means greedy")
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    do_sample: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[StopStr] = Field(default_factory=list, max_length=16)
    return_full_text: bool = False
    details: bool = False

    @field_validator("temperature", "top_p", "repetition_penalty")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class GenerateRequest(StrictModel):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = Field(None, description="the seed of a sampled generation (absent when greedy)")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamToken(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class StreamResponse(BaseModel):
    """One Server-Sent Event of /generate_stream (TGI's shape); the last one carries the text and details."""

    index: int
    token: StreamToken
    generated_text: str | None = None
    details: Details | None = None


class ErrorBody(BaseModel):
    error: str
    error_type: str


class HealthBody(BaseModel):
    status: Literal["ready", "loading", "draining", "failed"]
    detail: str | None = None
