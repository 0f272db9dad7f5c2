"""Service settings, read from the environment (prefix QS_) by pydantic-settings."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    ByteSize,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

import quant
from quant.checkpoints import DEFAULT_CACHE_DIR, DEFAULT_MODEL
from quant.config import QuantOptions, check_knob, normalize_knob, split_patterns
from quant.prequantized import NATIVE, PrequantizedError, check_precision, find_source

_HOST = re.compile(r"[0-9A-Za-z.:\-\[\]]+")  # IPv4, IPv6 or a DNS name; resolving is uvicorn's job
_LIST_KNOBS = tuple(name for name, kind in QuantOptions.knob_types().items() if kind == tuple[str, ...])


class _ServiceSettings(BaseSettings):
    """What the service reads from QS_* besides the quantization knobs (added below, from `QuantOptions`)."""

    model_config = SettingsConfigDict(env_prefix="QS_", extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="local HF model directory, hub id, or path to a .gguf file; default: the embedded SmolLM2-135M-Instruct",
    )
    precision: str = Field(
        "fp32",
        description="precision mode, or comma-separated modes served side by side (the first is the default); "
        "see `quant.list_modes()`",
    )
    max_memory: ByteSize | None = Field(
        None,
        description="bytes the modes' weights plus KV caches may take (`8GiB`, `500MB`); default: 80% of the "
        "memory available at start-up",
    )
    shadow_reference: str | None = Field(
        None, description="mode that sampled finished requests of the other modes are replayed on and scored against"
    )
    shadow_sample: float = Field(
        0.05, ge=0, le=1, description="share of finished requests replayed on QS_SHADOW_REFERENCE"
    )
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
    max_request_bytes: int = Field(
        2_000_000,
        ge=1,
        description="largest request body, counted as it arrives (413 beyond), as TGI's --payload-limit",
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="seconds a SIGTERM/SIGINT drain waits for running and queued requests"
    )
    stream_stall_timeout: float = Field(
        30.0, gt=0, description="seconds a stream may wait on a client that reads nothing before it is cancelled"
    )
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="converted checkpoints live here")
    api_key: SecretStr | None = Field(
        None, description="when set, generation routes need `Authorization: Bearer <key>`"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Read by `quant.kernels` (applied at load by `app.model_loader`); declared here so a bad value stops the start.
    kernels: Literal["auto", "reference"] = Field(
        "auto", description="`reference` forces the dequantize-then-matmul path"
    )
    kernel_isa: Literal["auto", "avx2", "avx512vnni"] = Field(
        "auto", description="kernel variant; auto: the best the CPU runs"
    )

    @field_validator(*QuantOptions.knob_names(), check_fields=False)
    @classmethod
    def _valid_knob(cls, value: object, info: ValidationInfo) -> object:
        value = normalize_knob(info.field_name, value)
        check_knob(info.field_name, value)
        return value

    @field_validator("precision")
    @classmethod
    def _known_precisions(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        if not names:
            raise ValueError(f"no precision mode given; accepted: {', '.join(quant.list_modes())}")
        for name in names:
            _check_mode(name)
        if len(set(names)) < len(names):
            raise ValueError(f"a mode is listed twice in {value!r}")
        return ",".join(names)

    @field_validator("shadow_reference")
    @classmethod
    def _known_reference(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return _check_mode(value.strip())

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        looks_local = value.startswith(("/", ".", "~")) or value.endswith(".gguf")
        if looks_local and not Path(value).expanduser().exists():
            raise ValueError(f"model path {value!r} does not exist; give a local directory, a .gguf file or a hub id")
        return value

    @field_validator(*_LIST_KNOBS, mode="before", check_fields=False)
    @classmethod
    def _split_patterns(cls, value: object) -> object:
        return split_patterns(value) if isinstance(value, str) else value

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
    def _limits_consistent(self) -> _ServiceSettings:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(
                f"QS_MAX_INPUT_TOKENS ({self.max_input_tokens}) must be below QS_MAX_TOTAL_TOKENS ({self.max_total_tokens})"
            )
        return self

    @model_validator(mode="after")
    def _precision_fits_the_checkpoint(self) -> _ServiceSettings:
        # A pre-quantized checkpoint serves its own precision: adopted when QS_PRECISION is unset.
        wanted = [*self.precision.split(","), *([self.shadow_reference] if self.shadow_reference else [])]
        try:
            found = {precision: find_source(self.model, precision) for precision in wanted}
        except PrequantizedError as error:
            raise ValueError(str(error)) from None
        if NATIVE in found and found[NATIVE] is None:
            raise ValueError(
                f"QS_PRECISION={NATIVE} needs a pre-quantized QS_MODEL (a .gguf file, a quantserve-save "
                f"directory, or a GPTQ/AWQ checkpoint); {self.model!r} is a float model"
            )
        adopted = found.get(self.precision)
        if "precision" not in self.model_fields_set and adopted is not None:
            found[adopted.stored_precision] = found.pop(self.precision)
            self.precision = adopted.stored_precision
        try:
            for precision, source in found.items():
                if source is not None:
                    check_precision(source, precision)
        except PrequantizedError as error:
            raise ValueError(str(error)) from None
        return self

    @property
    def precisions(self) -> tuple[str, ...]:
        """The served modes, the default first."""
        return tuple(self.precision.split(","))

    @property
    def default_precision(self) -> str:
        return self.precisions[0]

    @property
    def shadowing(self) -> bool:
        """Whether sampled requests of some served mode are replayed on the reference."""
        reference = self.shadow_reference
        return reference is not None and self.shadow_sample > 0 and any(p != reference for p in self.precisions)

    def for_mode(self, precision: str) -> _ServiceSettings:
        """These settings with one precision mode: what building that mode reads."""
        return self.model_copy(update={"precision": precision})

    @property
    def batch_slots(self) -> int:
        """Sequences decoded together: never more than may be in flight."""
        return min(self.max_batch_size, self.max_concurrent_requests)

    @property
    def queue_limit(self) -> int:
        """Requests that may wait for a slot: QS_MAX_QUEUE, within what QS_MAX_CONCURRENT_REQUESTS leaves."""
        left = self.max_concurrent_requests - self.batch_slots
        return left if self.max_queue is None else min(self.max_queue, left)

    def quant_options(self, device: str) -> QuantOptions:
        return QuantOptions(**self.knob_values(), device=device)

    def knob_values(self) -> dict[str, object]:
        """The quantization knobs this process was started with, by name."""
        return {name: getattr(self, name) for name in QuantOptions.knob_names()}


def _check_mode(name: str) -> str:
    modes = [*quant.list_modes(), NATIVE]
    if name not in modes:
        raise ValueError(f"unknown precision {name!r}; accepted: {', '.join(modes)}")
    return name


def _knob_fields() -> dict[str, Any]:
    """One QS_<NAME> field per `QuantOptions` knob, with its type, default and help from there."""
    definitions: dict[str, Any] = {}
    for name, kind in QuantOptions.knob_types().items():
        annotation = Annotated[kind, NoDecode] if name in _LIST_KNOBS else kind  # comma-separated, not JSON
        definitions[name] = (
            annotation,
            Field(QuantOptions.knobs()[name].default, description=QuantOptions.help_text(name)),
        )
    return definitions


# The service's own settings plus the quantization knobs, which are declared once, in `QuantOptions`.
Settings = create_model("Settings", __base__=_ServiceSettings, __module__=__name__, **_knob_fields())


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
