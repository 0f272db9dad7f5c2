"""Service settings, read from the environment (prefix QS_) by pydantic-settings."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

import quant
from quant.checkpoints import DEFAULT_CACHE_DIR, DEFAULT_MODEL
from quant.config import FP8_FORMATS, GROUP_SIZES

_MODULE_PATTERN = re.compile(r"[\w.*?\[\]]+")
_HOST = re.compile(r"[0-9A-Za-z.:\-\[\]]+")  # IPv4, IPv6 or a DNS name; resolving is uvicorn's job


_SUPPORTED: dict[str, tuple[object, ...]] = {"group_size": GROUP_SIZES, "fp8_format": FP8_FORMATS}


def _one_of(values: tuple[object, ...]) -> str:
    return ", ".join(str(v) for v in values[:-1]) + f" or {values[-1]}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QS_", extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="local HF model directory, hub id, or path to a .gguf file; default: the embedded SmolLM2-135M-Instruct",
    )
    precision: str = Field("fp32", description="precision mode (see `quant.list_modes()`)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    max_input_tokens: int = Field(1024, ge=1, description="longest prompt accepted, in tokens")
    max_total_tokens: int = Field(2048, ge=2, description="prompt tokens + max_new_tokens, at most")
    max_concurrent_requests: int = Field(16, ge=1, description="generation requests in flight before 429")
    max_batch_size: int = Field(8, ge=1, le=256, description="sequences decoded together (KV cache slots)")
    max_queue: int | None = Field(
        None,
        ge=0,
        description="requests waiting for a batch slot before 429; default: what QS_MAX_CONCURRENT_REQUESTS leaves",
    )
    request_timeout: float | None = Field(
        None, gt=0, description="seconds a generation may take from arrival (queue included); unset: no limit"
    )
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="converted checkpoints live here")
    api_key: SecretStr | None = Field(
        None, description="when set, generation routes need `Authorization: Bearer <key>`"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Quantization knobs, passed to the mode as `quant.QuantOptions`.
    # Plain types plus validators: the environment gives strings, which `Literal[32, ...]` would refuse.
    group_size: int = Field(64, description=f"group size of the 4-bit modes: {_one_of(GROUP_SIZES)}")
    outlier_threshold: float = Field(6.0, gt=0, description="int8-mixed: activation magnitude kept in float")
    fp8_format: str = Field("e4m3", description=f"fp8 storage format: {_one_of(FP8_FORMATS)}")
    quantize_lm_head: bool = False
    skip_modules: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="comma-separated module name patterns kept in float"
    )

    # Read by `quant.kernels` (applied at load by `app.model_loader`); declared here so a bad value stops the start.
    kernels: Literal["auto", "reference"] = Field(
        "auto", description="`reference` forces the dequantize-then-matmul path"
    )
    kernel_isa: Literal["auto", "avx2", "avx512vnni"] = Field(
        "auto", description="kernel variant; auto: the best the CPU runs"
    )

    @field_validator("group_size", "fp8_format")
    @classmethod
    def _one_of_the_supported(cls, value: object, info: ValidationInfo) -> object:
        supported = _SUPPORTED[info.field_name]
        if value not in supported:
            raise ValueError(f"{value!r} not supported; accepted: {_one_of(supported)}")
        return value

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        modes = quant.list_modes()
        if value not in modes:
            raise ValueError(f"unknown precision {value!r}; accepted: {', '.join(modes)}")
        return value

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        looks_local = value.startswith(("/", ".", "~")) or value.endswith(".gguf")
        if looks_local and not Path(value).expanduser().exists():
            raise ValueError(f"model path {value!r} does not exist; give a local directory, a .gguf file or a hub id")
        return value

    @field_validator("skip_modules", mode="before")
    @classmethod
    def _split_patterns(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("skip_modules")
    @classmethod
    def _patterns_are_module_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not _MODULE_PATTERN.fullmatch(pattern):
                raise ValueError(f"{pattern!r} is not a module name pattern (letters, digits, _ . * ? [ ])")
        return value

    @field_validator("host")
    @classmethod
    def _host_is_an_address(cls, value: str) -> str:
        if not _HOST.fullmatch(value):
            raise ValueError(f"{value!r} is not an IP address or host name")
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key_is_usable(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty or spaced key could never be sent as `Bearer <key>`: refuse it rather than serve unguarded.
        if value is not None and (not value.get_secret_value() or any(c.isspace() for c in value.get_secret_value())):
            raise ValueError("must be a non-empty key without spaces (leave it unset for no key)")
        return value

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_is_a_directory(cls, value: Path) -> Path:
        if value.expanduser().exists() and not value.expanduser().is_dir():
            raise ValueError(f"{str(value)!r} exists and is not a directory")
        return value.expanduser()

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(
                f"QS_MAX_INPUT_TOKENS ({self.max_input_tokens}) must be below QS_MAX_TOTAL_TOKENS ({self.max_total_tokens})"
            )
        return self

    @property
    def batch_slots(self) -> int:
        """Sequences decoded together: never more than may be in flight."""
        return min(self.max_batch_size, self.max_concurrent_requests)

    @property
    def queue_limit(self) -> int:
        """Requests that may wait for a slot: QS_MAX_QUEUE, within what QS_MAX_CONCURRENT_REQUESTS leaves."""
        left = self.max_concurrent_requests - self.batch_slots
        return left if self.max_queue is None else min(self.max_queue, left)

    def quant_options(self, device: str) -> quant.QuantOptions:
        return quant.QuantOptions(
            group_size=self.group_size,
            outlier_threshold=self.outlier_threshold,
            fp8_format=self.fp8_format,
            quantize_lm_head=self.quantize_lm_head,
            skip_modules=self.skip_modules,
            device=device,
        )


class SettingsError(ValueError):
    """Invalid configuration; the message is one line naming the variable."""


def describe_error(error: ValidationError) -> str:
    """One line per bad variable: `QS_NAME: what is wrong (accepted values)`."""
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        var = f"QS_{loc[0].upper()}" if loc else "settings"
        msg = item["msg"].removeprefix("Value error, ")
        ctx = item.get("ctx") or {}
        if "expected" in ctx and str(ctx["expected"]) not in msg:
            msg = f"{msg}; accepted: {ctx['expected']}"
        lines.append(f"invalid {var}: {msg}")
    return "; ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning pydantic's report into one readable line."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_error(error)) from None


@lru_cache
def get_settings() -> Settings:
    return load_settings()
