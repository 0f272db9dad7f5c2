"""The model service: life cycle, limits and admission, on top of the engine.

It owns everything that touches the model. API adapters (`app.api`) call it to
tokenize, to open one event stream per prompt and to await results; it knows no
wire format. Generation metrics are recorded once, from the engine's finish callback.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import app
from app.engine.engine import Engine, EngineOverloaded, EngineStopped, EventStream, GenerationRequest
from app.engine.events import ErrorEvent, ErrorKind, Finish, Generation, PromptEvent, TokenEvent
from app.engine.runner import ModelRunner, make_runner, runner_name
from app.engine.sampling import SamplingParams
from app.errors import (
    GenerationError,
    InputValidationError,
    OverloadedError,
    RequestTimeoutError,
    ServiceError,
    UnavailableError,
)
from app.metrics import ServiceMetrics
from app.model_loader import LoadedModel, eos_token_ids, load_model
from app.settings import Settings

log = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"
_ENGINE_ERRORS: dict[ErrorKind, type[ServiceError]] = {
    ErrorKind.TIMEOUT: RequestTimeoutError,
    ErrorKind.UNAVAILABLE: UnavailableError,
    ErrorKind.GENERATION: GenerationError,
}


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


Loader = Callable[[Settings], LoadedModel]


class ModelService:
    def __init__(self, settings: Settings, loader: Loader = load_model) -> None:
        self.settings = settings
        self._loader = loader
        self.state = State.LOADING
        self.failure: str | None = None
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.metrics = ServiceMetrics(model=self.model_name, precision=settings.precision)
        self._ready = threading.Event()
        self.ready_seconds: float | None = None
        self.runner: str | None = None  # the decode path: "native", "lean" or "transformers"
        self.started_at = int(time.time())

    @property
    def model_name(self) -> str:
        """The name clients see (OpenAI's `model`, the metrics label)."""
        return self.settings.model.rstrip("/").rsplit("/", 1)[-1].removeprefix("embedded:")

    # --- life cycle -------------------------------------------------------
    def load(self) -> None:
        """Load, quantize and warm up; run on a background thread by the lifespan."""
        started = time.perf_counter()
        try:
            loaded = self._loader(self.settings)
            engine = Engine(
                self._make_runner(loaded),
                loaded.tokenizer,
                eos_token_ids(loaded),
                loaded.device,
                max_batch_size=self.settings.batch_slots,
                max_queue=self.settings.queue_limit,
                on_state=self.metrics.set_scheduler_state,
                on_batch=self.metrics.observe_batch_size,
                on_finish=self._record_finish,
            )
            warmup_ids = loaded.tokenizer(WARMUP_PROMPT)["input_ids"]
            engine.run_blocking(GenerationRequest(warmup_ids, SamplingParams(max_new_tokens=2)))
            engine.start()
        except Exception as error:
            self.failure = f"{type(error).__name__}: {error}"
            self.state = State.FAILED
            log.error("model load failed: %s", self.failure)
            self._ready.set()
            return
        self.loaded, self.engine = loaded, engine
        self.runner = runner_name(engine.runner)
        self.metrics.set_model_info(loaded.report, loaded.device)
        self.ready_seconds = time.perf_counter() - started
        self.state = State.READY
        log.info(
            "ready in %.1f s: %s, precision %s on %s",
            self.ready_seconds,
            loaded.model_id,
            self.settings.precision,
            loaded.device,
        )
        self._ready.set()

    def _make_runner(self, loaded: LoadedModel) -> ModelRunner:
        """One KV cache slot per batch row, each long enough for the longest request."""
        return make_runner(loaded.model, loaded.device, self.settings.batch_slots, self.settings.max_total_tokens)

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def _record_finish(self, finish: Finish) -> None:
        """The engine's finish callback (worker thread): every served generation, whatever its API."""
        if self.state is not State.READY:  # the warm-up is not traffic
            return
        self.metrics.observe_generation(
            finish.prompt_tokens,
            finish.generated_tokens,
            finish.queue_seconds,
            finish.first_token_seconds,
            finish.total_seconds,
        )
        log.debug(
            "generation finished (%s): %d prompt + %d new tokens, queued %.3f s, first token %.3f s, total %.3f s",
            finish.finish_reason,
            finish.prompt_tokens,
            finish.generated_tokens,
            finish.queue_seconds,
            finish.first_token_seconds,
            finish.total_seconds,
        )

    # --- what the API adapters use -------------------------------------------
    def _require_ready(self) -> tuple[LoadedModel, Engine]:
        if self.state is not State.READY or self.loaded is None or self.engine is None:
            raise UnavailableError(f"model is {self.state.value}", headers={"Retry-After": "5"})
        return self.loaded, self.engine

    def tokenize(self, text: str) -> list[int]:
        loaded, _ = self._require_ready()
        return loaded.tokenizer(text)["input_ids"]

    def check_token_ids(self, token_ids: list[int]) -> list[int]:
        """A prompt given as token ids (OpenAI's `prompt: [ids]`): each must be in the model's vocabulary."""
        loaded, _ = self._require_ready()
        vocab = loaded.model.config.vocab_size
        outside = [t for t in token_ids if not 0 <= t < vocab]
        if outside:
            raise InputValidationError(f"token id {outside[0]} is outside the vocabulary (0 to {vocab - 1})")
        return token_ids

    def decode(self, token_ids: list[int]) -> str:
        """The text of a prompt given as token ids (what `echo` returns)."""
        return self._require_ready()[0].tokenizer.decode(token_ids)

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation formatted with the model's chat template, ready for the assistant's turn."""
        tokenizer = self._require_ready()[0].tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InputValidationError("the served model has no chat template; use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template rejects the conversation (e.g. roles out of order)
            raise InputValidationError(f"the chat template rejects these messages: {error}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def open(self, prompts: list[list[int]], params: SamplingParams) -> list[EventStream]:
        """One stream per prompt, or none: a refusal closes those already open. Raises before any byte is sent."""
        _, engine = self._require_ready()
        streams: list[EventStream] = []
        try:
            for prompt_ids in prompts:
                streams.append(self._open_one(engine, prompt_ids, params))
        except ServiceError:
            for stream in streams:
                stream.close()
            raise
        return streams

    def _open_one(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> EventStream:
        self._check_lengths(len(prompt_ids), params.max_new_tokens)
        request = GenerationRequest(prompt_ids, params, timeout=self.settings.request_timeout)
        try:
            return engine.open_stream(request)
        except EngineOverloaded as error:
            raise OverloadedError(str(error), headers={"Retry-After": "1"}) from None
        except EngineStopped as error:
            raise UnavailableError(str(error)) from None

    def _check_lengths(self, prompt_tokens: int, max_new_tokens: int) -> None:
        limits = self.settings
        if prompt_tokens > limits.max_input_tokens:
            raise InputValidationError(
                f"prompt has {prompt_tokens} tokens; QS_MAX_INPUT_TOKENS is {limits.max_input_tokens}"
            )
        if prompt_tokens + max_new_tokens > limits.max_total_tokens:
            raise InputValidationError(
                f"prompt tokens ({prompt_tokens}) + max_new_tokens ({max_new_tokens}) exceed "
                f"QS_MAX_TOTAL_TOKENS ({limits.max_total_tokens})"
            )

    async def results(self, streams: list[EventStream]) -> list[Generation]:
        """Wait for the end of non-streamed generations; the first failure raises its HTTP error."""
        tasks = [asyncio.ensure_future(_result(s)) for s in streams]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # gather leaves the other prompts running when one fails, and a closed stream gets no
            # more events: cancel their tasks, or they wait forever.
            for stream, task in zip(streams, tasks, strict=True):
                stream.close()
                task.cancel()

    # --- introspection ----------------------------------------------------
    def info(self) -> dict[str, Any]:
        s = self.settings
        data: dict[str, Any] = {
            "model_id": self.loaded.model_id if self.loaded else s.model,
            "precision": s.precision,
            "state": self.state.value,
            "version": app.__version__,
            "limits": {
                "max_input_tokens": s.max_input_tokens,
                "max_total_tokens": s.max_total_tokens,
                "max_concurrent_requests": s.max_concurrent_requests,
            },
            # the quantization and kernel knobs this process was started with
            "options": {**s.knob_values(), "kernels": s.kernels, "kernel_isa": s.kernel_isa},
            "scheduler": {
                "max_batch_size": s.batch_slots,
                "max_queue": s.queue_limit,
                "request_timeout": s.request_timeout,
            },
        }
        if self.engine is not None:
            running, waiting = self.engine.stats()
            data["scheduler"].update(running=running, waiting=waiting)
        if self.loaded is not None:
            report = self.loaded.report
            data.update(
                backend=report.backend,
                kernels=report.kernels,
                runner=self.runner,
                lm_head=report.lm_head,
                device=str(self.loaded.device),
                compute_dtype=report.compute_dtype,
                weight_bytes=report.total_weight_bytes,
                quantization=report.summary(),
                load_seconds=round(self.loaded.load_seconds, 3),
                ready_seconds=round(self.ready_seconds or 0.0, 3),
            )
        return data


async def _result(stream: EventStream) -> Generation:
    prompt: PromptEvent | None = None
    tokens: list[TokenEvent] = []
    async with stream:
        async for event in stream:
            if isinstance(event, ErrorEvent):
                raise _ENGINE_ERRORS.get(event.kind, GenerationError)(event.message)
            if isinstance(event, PromptEvent):
                prompt = event
            else:
                tokens.append(event)
            if event.finish is not None:
                return Generation(prompt, tokens, event.finish)
    raise GenerationError("the generation ended without a result")
