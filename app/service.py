"""The model service: load state, limits, and generation on top of the engine.

Routes talk to this class only; it owns everything that touches the model. It
turns requests of either API (TGI's /generate, OpenAI's /v1) into engine
requests and engine events back into response bodies or Server-Sent Event
payloads (JSON strings).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import app
from app.engine.engine import (
    Engine,
    EngineOverloaded,
    EngineStopped,
    ErrorEvent,
    EventStream,
    Finish,
    GenerationRequest,
    TokenEvent,
)
from app.engine.runner import ModelRunner, make_runner
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
from app.schemas import (
    Details,
    ErrorBody,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    StreamResponse,
    StreamToken,
)
from app.settings import Settings

log = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"
STREAM_END = "[DONE]"  # OpenAI's last Server-Sent Event
_ENGINE_ERRORS: dict[str, type[ServiceError]] = {
    "timeout": RequestTimeoutError,
    "unavailable": UnavailableError,
    "generation": GenerationError,
}
_OPENAI_FINISH: dict[str, OpenAIFinishReason] = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


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

    # --- generation primitives --------------------------------------------
    def _require_ready(self) -> tuple[LoadedModel, Engine]:
        if self.state is not State.READY or self.loaded is None or self.engine is None:
            raise UnavailableError(f"model is {self.state.value}", headers={"Retry-After": "5"})
        return self.loaded, self.engine

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

    def _open(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> EventStream:
        """Check the limits and hand the request to the engine; raises before any response byte is sent."""
        self._check_lengths(len(prompt_ids), params.max_new_tokens)
        request = GenerationRequest(prompt_ids, params, timeout=self.settings.request_timeout)
        try:
            return engine.open_stream(request)
        except EngineOverloaded as error:
            raise OverloadedError(str(error), headers={"Retry-After": "1"}) from None
        except EngineStopped as error:
            raise UnavailableError(str(error)) from None

    def _open_all(self, engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[EventStream]:
        """Open one stream per prompt, or none: a refusal closes those already open."""
        streams: list[EventStream] = []
        try:
            for prompt_ids in prompts:
                streams.append(self._open(engine, prompt_ids, params))
        except ServiceError:
            for stream in streams:
                stream.close()
            raise
        return streams

    def _finished(self, finish: Finish) -> Finish:
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
        return finish

    async def _result(self, stream: EventStream) -> Finish:
        """Wait for the end of a non-streamed generation."""
        async with stream:
            async for event in stream:
                if isinstance(event, ErrorEvent):
                    raise _ENGINE_ERRORS.get(event.error_type, GenerationError)(event.message)
                if event.finish is not None:
                    return self._finished(event.finish)
        raise GenerationError("the generation ended without a result")

    async def _results(self, streams: list[EventStream]) -> list[Finish]:
        tasks = [asyncio.ensure_future(self._result(s)) for s in streams]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # gather leaves the other prompts running when one fails, and a closed stream gets no
            # more events: cancel their tasks, or they wait forever.
            for stream, task in zip(streams, tasks, strict=True):
                stream.close()
                task.cancel()

    @staticmethod
    def _error_payload(event: ErrorEvent) -> str:
        """An error after the stream started: sent as an event, in the one error shape."""
        log.warning("generation failed mid-stream: %s: %s", event.error_type, event.message)
        return ErrorBody(error=event.message, error_type=event.error_type).model_dump_json()

    # --- TGI: /generate and /generate_stream -------------------------------
    @staticmethod
    def sampling_params(p: GenerateParameters) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            do_sample=p.do_sample,
            seed=p.seed,
            stop=list(p.stop),
        )

    def _open_tgi(self, body: GenerateRequest) -> EventStream:
        loaded, engine = self._require_ready()
        prompt_ids = loaded.tokenizer(body.inputs)["input_ids"]
        return self._open(engine, prompt_ids, self.sampling_params(body.parameters))

    @staticmethod
    def _tgi_text(body: GenerateRequest, finish: Finish) -> str:
        return body.inputs + finish.generated_text if body.parameters.return_full_text else finish.generated_text

    @staticmethod
    def _tgi_details(body: GenerateRequest, finish: Finish) -> Details | None:
        if not body.parameters.details:
            return None
        return Details(
            finish_reason=finish.finish_reason,
            generated_tokens=finish.generated_tokens,
            prompt_tokens=finish.prompt_tokens,
            seed=finish.seed,
        )

    async def generate(self, body: GenerateRequest) -> GenerateResponse:
        finish = await self._result(self._open_tgi(body))
        return GenerateResponse(generated_text=self._tgi_text(body, finish), details=self._tgi_details(body, finish))

    def generate_stream(self, body: GenerateRequest) -> AsyncIterator[str]:
        """Admit the request now (errors become HTTP statuses), then stream TGI's events as JSON."""
        return self._tgi_events(body, self._open_tgi(body))

    async def _tgi_events(self, body: GenerateRequest, stream: EventStream) -> AsyncIterator[str]:
        async with stream:
            async for event in stream:
                if isinstance(event, ErrorEvent):
                    yield self._error_payload(event)
                    return
                token = StreamToken(id=event.id, text=event.text, logprob=event.logprob, special=event.special)
                response = StreamResponse(index=event.index, token=token)
                if event.finish is not None:
                    finish = self._finished(event.finish)
                    response.generated_text = self._tgi_text(body, finish)
                    response.details = self._tgi_details(body, finish)
                yield response.model_dump_json()

    # --- OpenAI: /v1/... ----------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.started_at)])

    @staticmethod
    def _openai_params(body: SamplingFields, max_new_tokens: int) -> SamplingParams:
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

    def _chat_prompt_ids(self, loaded: LoadedModel, body: ChatCompletionRequest) -> list[int]:
        tokenizer = loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InputValidationError("the served model has no chat template; use /v1/completions")
        # "developer" is the newer name of "system"; chat templates know only the latter.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template rejects the conversation (e.g. roles out of order)
            raise InputValidationError(f"the chat template rejects these messages: {error}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def _open_completion(self, body: CompletionRequest) -> list[EventStream]:
        loaded, engine = self._require_ready()
        prompts = [loaded.tokenizer(p)["input_ids"] for p in body.prompts]
        return self._open_all(engine, prompts, self._openai_params(body, body.max_tokens or 16))

    def _open_chat(self, body: ChatCompletionRequest) -> EventStream:
        loaded, engine = self._require_ready()
        prompt_ids = self._chat_prompt_ids(loaded, body)
        budget = body.token_budget or max(self.settings.max_total_tokens - len(prompt_ids), 1)
        return self._open(engine, prompt_ids, self._openai_params(body, budget))

    @staticmethod
    def _usage(finishes: list[Finish]) -> Usage:
        prompt = sum(f.prompt_tokens for f in finishes)
        completion = sum(f.generated_tokens for f in finishes)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def completion(self, body: CompletionRequest) -> CompletionResponse:
        finishes = await self._results(self._open_completion(body))
        choices = [
            CompletionChoice(
                index=i,
                text=(prompt if body.echo else "") + f.generated_text,
                finish_reason=_OPENAI_FINISH[f.finish_reason],
            )
            for i, (prompt, f) in enumerate(zip(body.prompts, finishes, strict=True))
        ]
        return CompletionResponse(
            id=_new_id("cmpl"),
            created=int(time.time()),
            model=self.model_name,
            choices=choices,
            usage=self._usage(finishes),
        )

    def completion_stream(self, body: CompletionRequest) -> AsyncIterator[str]:
        return self._completion_chunks(body, self._open_completion(body))

    async def _completion_chunks(self, body: CompletionRequest, streams: list[EventStream]) -> AsyncIterator[str]:
        head = {"id": _new_id("cmpl"), "created": int(time.time()), "model": self.model_name}

        def chunk(index: int, text: str, reason: OpenAIFinishReason | None = None) -> str:
            choice = CompletionChoice(index=index, text=text, finish_reason=reason)
            return CompletionResponse(**head, choices=[choice]).model_dump_json()

        try:
            if body.echo:
                for i, prompt in enumerate(body.prompts):
                    yield chunk(i, prompt)
            finishes = []
            async for index, event in _merged(streams):
                if isinstance(event, ErrorEvent):
                    yield self._error_payload(event)
                    break
                if event.finish is not None:
                    finishes.append(self._finished(event.finish))
                    yield chunk(index, event.visible_text, _OPENAI_FINISH[event.finish.finish_reason])
                elif event.visible_text:
                    yield chunk(index, event.visible_text)
            else:
                if body.include_usage:
                    yield CompletionResponse(**head, choices=[], usage=self._usage(finishes)).model_dump_json()
            yield STREAM_END
        finally:
            for stream in streams:
                stream.close()

    async def chat_completion(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        finish = await self._result(self._open_chat(body))
        choice = ChatChoice(
            index=0,
            message=AssistantMessage(content=finish.generated_text),
            finish_reason=_OPENAI_FINISH[finish.finish_reason],
        )
        return ChatCompletionResponse(
            id=_new_id("chatcmpl"),
            created=int(time.time()),
            model=self.model_name,
            choices=[choice],
            usage=self._usage([finish]),
        )

    def chat_completion_stream(self, body: ChatCompletionRequest) -> AsyncIterator[str]:
        return self._chat_chunks(body, self._open_chat(body))

    async def _chat_chunks(self, body: ChatCompletionRequest, stream: EventStream) -> AsyncIterator[str]:
        head = {"id": _new_id("chatcmpl"), "created": int(time.time()), "model": self.model_name}

        def chunk(delta: ChatDelta, reason: OpenAIFinishReason | None = None) -> str:
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=reason)
            return ChatCompletionChunk(**head, choices=[choice]).model_dump_json()

        async with stream:
            yield chunk(ChatDelta(role="assistant", content=""))
            async for event in stream:
                if isinstance(event, ErrorEvent):
                    yield self._error_payload(event)
                    break
                if event.visible_text:
                    yield chunk(ChatDelta(content=event.visible_text))
                if event.finish is not None:
                    finish = self._finished(event.finish)
                    yield chunk(ChatDelta(), _OPENAI_FINISH[finish.finish_reason])
                    if body.include_usage:
                        yield ChatCompletionChunk(**head, choices=[], usage=self._usage([finish])).model_dump_json()
        yield STREAM_END

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
            "options": {  # the quantization and kernel knobs this process was started with
                "group_size": s.group_size,
                "outlier_threshold": s.outlier_threshold,
                "fp8_format": s.fp8_format,
                "quantize_lm_head": s.quantize_lm_head,
                "skip_modules": list(s.skip_modules),
                "kernels": s.kernels,
                "kernel_isa": s.kernel_isa,
            },
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
                device=str(self.loaded.device),
                compute_dtype=report.compute_dtype,
                weight_bytes=report.total_weight_bytes,
                quantization=report.summary(),
                load_seconds=round(self.loaded.load_seconds, 3),
                ready_seconds=round(self.ready_seconds or 0.0, 3),
            )
        return data


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _merged(streams: list[EventStream]) -> AsyncIterator[tuple[int, TokenEvent | ErrorEvent]]:
    """The events of several streams as they come, each with its stream's index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    arrivals: asyncio.Queue[tuple[int, TokenEvent | ErrorEvent]] = asyncio.Queue()

    async def pump(index: int, stream: EventStream) -> None:
        async for event in stream:
            arrivals.put_nowait((index, event))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            index, event = await arrivals.get()
            live -= isinstance(event, ErrorEvent) or event.finish is not None
            yield index, event
    finally:
        for task in pumps:
            task.cancel()
