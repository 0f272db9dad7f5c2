"""Request and response bodies (TGI's shapes for /generate)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateParameters(StrictModel):
    max_new_tokens: int = Field(20, ge=1)
    temperature: float | None = Field(None, ge=0, description="0 means greedy")
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    do_sample: bool = False
    seed: int | None = Field(None, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    return_full_text: bool = False
    details: bool = False

    @field_validator("temperature", "top_p", "repetition_penalty")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop sequences must be non-empty")
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
    seed: int | None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class ErrorBody(BaseModel):
    error: str
    error_type: str


class HealthBody(BaseModel):
    status: Literal["ready", "loading", "failed"]
    detail: str | None = None
