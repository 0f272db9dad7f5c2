"""The model service: life cycle, limits and admission, on top of the engines (one per precision mode).

It owns everything that touches the model. With several modes (QS_PRECISION=int4,int8,fp32)
each has its own engine and batch; their worker threads take turns on the CPU through one
`FairShare`, and with QS_SHADOW_REFERENCE a sampled share of finished requests is replayed
on the reference mode by a `ShadowScorer` in the same turns, at a low weight. API adapters (`app.api`) call it to
tokenize, to open one event stream per prompt and to await results; it knows no
wire format. Generation metrics are recorded once, from the engine's finish callback.

Tokenization and chat templating run on a small thread pool, never on the event loop,
and a prompt whose length in characters alone proves it over QS_MAX_INPUT_TOKENS is
refused before any of it is tokenized. `drain` is the graceful stop (SIGTERM/SIGINT).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import app
from app.engine.engine import Engine, EngineOverloaded, EngineStopped, EventStream, GenerationRequest
from app.engine.events import ErrorEvent, ErrorKind, Finish, Generation, PromptEvent, TokenEvent
from app.engine.fair_share import FairShare
from app.engine.runner import ModelRunner, make_runner, runner_name
from app.engine.sampling import SamplingParams
from app.engine.shadow import ShadowScorer
from app.errors import (
    GenerationError,
    InputValidationError,
    OverloadedError,
    RequestTimeoutError,
    ServiceError,
    UnavailableError,
)
from app.metrics import ServiceMetrics
from app.model_loader import LoadedModel, eos_token_ids
from app.modes import ModeLoader, ModeMemory, ServedMode, memory_budget, mode_cache_bytes, modes_to_build
from app.settings import Settings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"
# Threads that tokenize and apply chat templates: the tokenizer is fast Rust code that releases
# the GIL, and the prompts are bounded (QS_MAX_REQUEST_BYTES, the character bound), so two keep up.
TOKENIZER_THREADS = 2
# Normalizers that never shorten a text, so a token still covers at most its vocabulary entry's characters.
_NON_SHORTENING_NORMALIZERS = {"Prepend", "NFD", "NFKD", "Lowercase"}
T = TypeVar("T")
_ENGINE_ERRORS: dict[ErrorKind, type[ServiceError]] = {
    ErrorKind.TIMEOUT: RequestTimeoutError,
    ErrorKind.UNAVAILABLE: UnavailableError,
    ErrorKind.GENERATION: GenerationError,
}


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # shutting down: running and queued requests finish, new ones get 503
    FAILED = "failed"  # the load or the engine failed


Loader = Callable[[Settings], LoadedModel]


class ModelService:
    def __init__(self, settings: Settings, loader: Loader | None = None) -> None:
        self.settings = settings
        # the default builds every mode from one float load; a given loader is called once per mode
        self._loader: Loader = loader or ModeLoader(len(modes_to_build(settings)))
        self.state = State.LOADING
        self.failure: str | None = None
        # the default mode's model and engine (every mode's are in `modes`)
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.modes: dict[str, ServedMode] = {}  # served modes first, in QS_PRECISION's order
        self.memory: ModeMemory | None = None
        self.share: FairShare | None = None  # the CPU's turns, when more than one party wants it
        self.shadow: ShadowScorer | None = None
        self._shadow_draw = random.Random()
        # series of the default mode; `metrics_for` gives each mode's view of the same registry
        self.metrics = ServiceMetrics(model=self.model_name, precision=settings.default_precision)
        self._ready = threading.Event()
        self.ready_seconds: float | None = None
        self.runner: str | None = None  # the decode path: "native", "lean" or "transformers"
        self.started_at = int(time.time())
        self.max_chars_per_token: int | None = None  # the tokenizer's bound, once loaded (None: none derived)
        self._state_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="qs-tokenize")

    @property
    def model_name(self) -> str:
        """The name clients see (OpenAI's `model`, the metrics label)."""
        return self.settings.model.rstrip("/").rsplit("/", 1)[-1].removeprefix("embedded:")

    # --- life cycle -------------------------------------------------------
    def load(self) -> None:
        """Load, quantize and warm up every mode; run on a background thread by the lifespan."""
        started = time.perf_counter()
        settings = self.settings
        try:
            wanted = modes_to_build(settings)
            self.memory = ModeMemory(memory_budget(settings))
            if len(settings.precisions) > 1 or settings.shadowing:
                self.share = FairShare()
            for precision in wanted:
                self.modes[precision] = self._build_mode(precision, wanted, started)
            default = self.modes[settings.default_precision]
            loaded, engine = default.loaded, default.engine
            assert engine is not None
            self.max_chars_per_token = max_chars_per_token(loaded.tokenizer)
            if settings.shadowing:
                self._start_shadow()
            for mode in self.modes.values():
                if mode.engine is not None:
                    mode.engine.start()
        except Exception as error:
            self.failure = f"{type(error).__name__}: {error}"
            self.state = State.FAILED
            log.error("model load failed: %s", self.failure)
            for mode in self.modes.values():
                if mode.engine is not None:
                    mode.engine.stop()
            self._ready.set()
            return
        self.loaded, self.engine = loaded, engine
        self.runner = default.runner
        self.ready_seconds = time.perf_counter() - started
        with self._state_lock:
            if self.state is not State.LOADING:  # a drain began while loading: do not serve
                engine.request_stop()
                self._ready.set()
                return
            self.state = State.READY
        log.info(
            "ready in %.1f s: %s, precision %s on %s",
            self.ready_seconds,
            loaded.model_id,
            self.settings.precision,
            loaded.device,
        )
        self._ready.set()

    def _build_mode(self, precision: str, wanted: tuple[str, ...], started: float) -> ServedMode:
        """Build one mode (one `load_model` call), count it against QS_MAX_MEMORY, give it its engine and warm it up."""
        settings = self.settings
        loaded = self._loader(settings.for_mode(precision))
        served = precision in settings.precisions
        assert self.memory is not None
        self.memory.add(
            precision, loaded.report.total_weight_bytes, mode_cache_bytes(loaded, settings) if served else 0, wanted
        )
        metrics = self.metrics.for_mode(precision)
        metrics.set_model_info(loaded.report, loaded.device)
        mode = ServedMode(precision, loaded, metrics)
        if not served:  # the shadow reference only: it scores, it does not serve
            return mode
        if self.share is not None:
            self.share.join(precision)
        engine = Engine(
            self._make_runner(loaded),
            loaded.tokenizer,
            eos_token_ids(loaded),
            loaded.device,
            max_batch_size=settings.batch_slots,
            max_queue=settings.queue_limit,
            on_state=metrics.set_scheduler_state,
            on_batch=metrics.observe_batch_size,
            on_finish=functools.partial(self._record_finish, metrics),
            on_fault=functools.partial(self._engine_failed, metrics),
            on_replay=functools.partial(self._offer_replay, metrics),
            share=self.share,
            name=precision,
        )
        warmup_ids = loaded.tokenizer(WARMUP_PROMPT)["input_ids"]
        engine.run_blocking(GenerationRequest(warmup_ids, SamplingParams(max_new_tokens=2)))
        if engine.failure is not None:
            raise RuntimeError(f"the warm-up generation of {precision} failed: {engine.failure}")
        mode.engine, mode.runner = engine, runner_name(engine.runner)
        mode.ready_seconds = time.perf_counter() - started
        log.info("mode %s built: %s weight bytes, runner %s", precision, loaded.report.total_weight_bytes, mode.runner)
        return mode

    def _start_shadow(self) -> None:
        reference = self.settings.shadow_reference
        assert reference is not None and self.share is not None
        self.shadow = ShadowScorer(
            reference, self.modes[reference].loaded.model, self.share, self.settings.shadow_sample
        )
        for mode in self.modes.values():
            if mode.engine is not None and mode.precision != reference:
                mode.metrics.start_shadow(reference)
        self.shadow.start()
        log.info(
            "shadow scoring: %g of the requests of %s replayed on %s",
            self.settings.shadow_sample,
            ",".join(p for p in self.settings.precisions if p != reference),
            reference,
        )

    def metrics_for(self, precision: str | None) -> ServiceMetrics:
        """The series of one mode (the default's when None or unknown)."""
        mode = self.modes.get(precision or "")
        return mode.metrics if mode is not None else self.metrics

    @property
    def served_precisions(self) -> tuple[str, ...]:
        """The modes a request may name, the default first."""
        return self.settings.precisions

    def _make_runner(self, loaded: LoadedModel) -> ModelRunner:
        """One KV cache slot per batch row, each long enough for the longest request."""
        return make_runner(loaded.model, loaded.device, self.settings.batch_slots, self.settings.max_total_tokens)

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _engines(self) -> list[Engine]:
        return [m.engine for m in self.modes.values() if m.engine is not None]

    def _stats(self) -> tuple[int, int]:
        """(running, waiting) over every mode."""
        stats = [engine.stats() for engine in self._engines()]
        return sum(r for r, _ in stats), sum(w for _, w in stats)

    def shutdown(self) -> None:
        for engine in self._engines():
            engine.request_stop()
        for engine in self._engines():
            engine.stop()
        if self.shadow is not None:
            self.shadow.stop()
        if self.share is not None:
            self.share.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def drain(self, timeout: float, cut_short: asyncio.Event | None = None) -> None:
        """Take no more requests; let running and queued ones finish for up to `timeout` seconds
        (or until `cut_short` is set), then end what is left with an `unavailable` error."""
        with self._state_lock:
            if self.state in (State.LOADING, State.READY):
                self.state = State.DRAINING
        engines = self._engines()
        if not engines:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._stats() != (0, 0) and loop.time() < deadline and not (cut_short and cut_short.is_set()):
            await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))
        running, waiting = self._stats()
        if running or waiting:
            log.warning("drain: %d running and %d waiting requests end with an error", running, waiting)
        for engine in engines:
            engine.request_stop()  # the worker sends each of them its error event, after its current step
        stopping_until = loop.time() + 5
        while (
            self._stats() != (0, 0) and not any(e.failure is not None for e in engines) and loop.time() < stopping_until
        ):
            await asyncio.sleep(0.01)

    def _engine_failed(self, metrics: ServiceMetrics, reason: str) -> None:
        """An engine's fault callback (worker thread): /health turns `failed`, the mode's counter goes up."""
        metrics.engine_failures.labels(**metrics.labels).inc()
        with self._state_lock:
            self.failure = f"engine failed: {reason}"
            self.state = State.FAILED

    def _record_finish(self, metrics: ServiceMetrics, finish: Finish) -> None:
        """An engine's finish callback (worker thread): every served generation, whatever its API."""
        if self.state is not State.READY:  # the warm-up is not traffic
            return
        metrics.observe_generation(
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

    def _offer_replay(
        self, metrics: ServiceMetrics, prompt_ids: list[int], generated: list[int], logits: torch.Tensor
    ) -> None:
        """An engine's replay callback (worker thread): a sampled request ended; queue its shadow replay."""
        if self.shadow is not None and self.state is State.READY:
            self.shadow.offer(metrics, prompt_ids, generated, logits)

    def _shadowed(self, precision: str, params: SamplingParams) -> bool:
        """Whether this request is drawn for a shadow replay (it then keeps its logits while served)."""
        settings = self.settings
        if self.shadow is None or precision == settings.shadow_reference or params.max_new_tokens == 0:
            return False
        return self._shadow_draw.random() < settings.shadow_sample

    # --- what the API adapters use -------------------------------------------
    def _require_ready(self, precision: str | None = None) -> tuple[LoadedModel, Engine]:
        if self.state is State.DRAINING:
            raise UnavailableError("the server is shutting down")
        if self.state is not State.READY or self.loaded is None or self.engine is None:
            raise UnavailableError(f"model is {self.state.value}", headers={"Retry-After": "5"})
        if precision is None or precision == self.settings.default_precision:
            return self.loaded, self.engine
        mode = self.modes.get(precision)
        if mode is None or mode.engine is None:
            raise InputValidationError(
                f"precision {precision!r} is not served here; accepted: {', '.join(self.served_precisions)}"
            )
        return mode.loaded, mode.engine

    async def _off_loop(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _refuse_early(self, engine: Engine, prompt_chars: int) -> None:
        """What can be refused before tokenizing: a full engine (429), a prompt too long in characters alone (422)."""
        if engine.is_full():
            raise OverloadedError(
                "every batch slot and waiting place is taken; retry later", headers={"Retry-After": "1"}
            )
        bound = self.max_chars_per_token
        if bound is not None and prompt_chars > self.settings.max_input_tokens * bound:
            raise InputValidationError(
                f"prompt has {prompt_chars} characters, so more than QS_MAX_INPUT_TOKENS "
                f"({self.settings.max_input_tokens}) tokens: a token of this tokenizer covers at most {bound}"
            )

    async def tokenize(self, text: str, precision: str | None = None) -> list[int]:
        loaded, engine = self._require_ready(precision)
        self._refuse_early(engine, len(text))
        return await self._off_loop(lambda: loaded.tokenizer(text)["input_ids"])

    def check_token_ids(self, token_ids: list[int], precision: str | None = None) -> list[int]:
        """A prompt given as token ids (OpenAI's `prompt: [ids]`): each must be in the model's vocabulary."""
        loaded, engine = self._require_ready(precision)
        self._refuse_early(engine, 0)
        vocab = loaded.model.config.vocab_size
        outside = [t for t in token_ids if not 0 <= t < vocab]
        if outside:
            raise InputValidationError(f"token id {outside[0]} is outside the vocabulary (0 to {vocab - 1})")
        return token_ids

    def decode(self, token_ids: list[int]) -> str:
        """The text of a prompt given as token ids (what `echo` returns)."""
        return self._require_ready()[0].tokenizer.decode(token_ids)

    async def chat_prompt_ids(self, messages: list[dict[str, str]], precision: str | None = None) -> list[int]:
        """The conversation formatted with the model's chat template, ready for the assistant's turn."""
        loaded, engine = self._require_ready(precision)
        tokenizer = loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InputValidationError("the served model has no chat template; use /v1/completions")
        # a template may drop or trim text, so the character bound is checked on its output
        self._refuse_early(engine, 0)

        def template_and_tokenize() -> list[int]:
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as error:  # the template rejects the conversation (e.g. roles out of order)
                raise InputValidationError(f"the chat template rejects these messages: {error}") from None
            self._refuse_early(engine, len(text))
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        return await self._off_loop(template_and_tokenize)

    def open(self, prompts: list[list[int]], params: SamplingParams, precision: str | None = None) -> list[EventStream]:
        """One stream per prompt in `precision` (None: the default mode), or none: a refusal closes those
        already open. Raises before any byte is sent."""
        _, engine = self._require_ready(precision)
        precision = precision or self.settings.default_precision
        streams: list[EventStream] = []
        try:
            for prompt_ids in prompts:
                streams.append(self._open_one(engine, prompt_ids, params, self._shadowed(precision, params)))
        except ServiceError:
            for stream in streams:
                stream.close()
            raise
        return streams

    def _open_one(
        self, engine: Engine, prompt_ids: list[int], params: SamplingParams, shadowed: bool = False
    ) -> EventStream:
        self._check_lengths(len(prompt_ids), params.max_new_tokens)
        request = GenerationRequest(prompt_ids, params, timeout=self.settings.request_timeout, keep_logits=shadowed)
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
            "precision": s.default_precision,  # the default mode; `modes` lists every one
            "state": self.state.value,
            "version": app.__version__,
            "limits": {
                "max_input_tokens": s.max_input_tokens,
                "max_total_tokens": s.max_total_tokens,
                "max_concurrent_requests": s.max_concurrent_requests,
                "max_request_bytes": s.max_request_bytes,
                "max_chars_per_token": self.max_chars_per_token,
            },
            # the quantization and kernel knobs this process was started with
            "options": {**s.knob_values(), "kernels": s.kernels, "kernel_isa": s.kernel_isa},
            "scheduler": {
                "max_batch_size": s.batch_slots,
                "max_queue": s.queue_limit,
                "request_timeout": s.request_timeout,
                "stream_stall_timeout": s.stream_stall_timeout,
                "shutdown_timeout": s.shutdown_timeout,
            },
        }
        if self.engine is not None:
            running, waiting = self._stats()
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
        data["modes"] = [mode.describe(default=p == s.default_precision) for p, mode in self.modes.items()]
        if self.memory is not None:
            data["memory"] = {
                "max_memory": self.memory.budget,
                "weights_and_kv_caches": self.memory.total,
            }
        if s.shadowing:
            data["shadow"] = {
                "reference": s.shadow_reference,
                "sample": s.shadow_sample,
                "scored": self.shadow.scored if self.shadow else 0,
                "failed": self.shadow.failed if self.shadow else 0,
                "dropped": self.shadow.dropped if self.shadow else 0,
                "pending": self.shadow.pending if self.shadow else 0,
            }
        if self.share is not None:
            data["cpu_seconds_by_party"] = {k: round(v, 3) for k, v in self.share.used_seconds().items()}
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


def max_chars_per_token(tokenizer: Any) -> int | None:
    """Most characters of a prompt that one token can cover, from the vocabulary; None if no safe bound.

    A token covers at most as many characters as its vocabulary entry is long: a byte-level BPE
    entry spells one character per byte (and a character is at least one byte), a SentencePiece
    entry spells its text (`▁` for the space), added tokens match their text literally. So a prompt
    of n characters has at least n / bound tokens. That holds only if the normalizer cannot shorten
    the text first (NFC composition, stripping, cleaning would), so then no bound is given.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if not _never_shortens(json.loads(backend.to_str()).get("normalizer")):
        return None
    vocabulary = tokenizer.get_vocab()
    return max(map(len, vocabulary), default=0) or None


def _never_shortens(normalizer: dict[str, Any] | None) -> bool:
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_never_shortens(step) for step in normalizer.get("normalizers", []))
    if kind == "Replace":
        pattern = normalizer.get("pattern", {})
        return "String" in pattern and len(normalizer.get("content", "")) >= len(pattern["String"])
    return kind in _NON_SHORTENING_NORMALIZERS
