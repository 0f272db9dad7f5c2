"""The model service: load state, limits, and generation on top of the engine.

Routes talk to this class only; it owns everything that touches the model.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import app
from app.engine.engine import Engine, ErrorEvent, FinishEvent, GenerationRequest
from app.engine.runner import HFRunner
from app.engine.sampling import SamplingParams
from app.errors import GenerationError, InputValidationError, OverloadedError, UnavailableError
from app.metrics import ServiceMetrics
from app.model_loader import LoadedModel, eos_token_ids, load_model
from app.schemas import Details, GenerateParameters, GenerateRequest, GenerateResponse
from app.settings import Settings

log = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"


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
        self.metrics = ServiceMetrics(model=self._model_label(), precision=settings.precision)
        self._ready = threading.Event()
        self._in_flight = 0
        self._lock = threading.Lock()
        self.ready_seconds: float | None = None

    def _model_label(self) -> str:
        return self.settings.model.rsplit("/", 1)[-1].removeprefix("embedded:")

    # --- life cycle -------------------------------------------------------
    def load(self) -> None:
        """Load, quantize and warm up; run on a background thread by the lifespan."""
        started = time.perf_counter()
        try:
            loaded = self._loader(self.settings)
            engine = Engine(
                HFRunner(loaded.model, loaded.device), loaded.tokenizer, eos_token_ids(loaded), loaded.device
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
        self.metrics.weight_bytes.labels(**self.metrics.labels).set(loaded.report.total_weight_bytes)
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

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # --- requests ---------------------------------------------------------
    def _require_ready(self) -> tuple[LoadedModel, Engine]:
        if self.state is not State.READY or self.loaded is None or self.engine is None:
            raise UnavailableError(f"model is {self.state.value}", headers={"Retry-After": "5"})
        return self.loaded, self.engine

    def _admit(self) -> None:
        with self._lock:
            if self._in_flight >= self.settings.max_concurrent_requests:
                raise OverloadedError(
                    f"more than {self.settings.max_concurrent_requests} requests in flight; retry later",
                    headers={"Retry-After": "1"},
                )
            self._in_flight += 1
            self.metrics.in_flight.labels(**self.metrics.labels).set(self._in_flight)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self.metrics.in_flight.labels(**self.metrics.labels).set(self._in_flight)

    def _tokenize(self, loaded: LoadedModel, text: str, max_new_tokens: int) -> list[int]:
        ids = loaded.tokenizer(text)["input_ids"]
        limits = self.settings
        if len(ids) > limits.max_input_tokens:
            raise InputValidationError(
                f"prompt has {len(ids)} tokens; QS_MAX_INPUT_TOKENS is {limits.max_input_tokens}"
            )
        if len(ids) + max_new_tokens > limits.max_total_tokens:
            raise InputValidationError(
                f"prompt tokens ({len(ids)}) + max_new_tokens ({max_new_tokens}) exceed "
                f"QS_MAX_TOTAL_TOKENS ({limits.max_total_tokens})"
            )
        return ids

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

    async def generate(self, body: GenerateRequest) -> GenerateResponse:
        loaded, engine = self._require_ready()
        params = body.parameters
        prompt_ids = self._tokenize(loaded, body.inputs, params.max_new_tokens)
        self._admit()
        started = time.perf_counter()
        try:
            request = GenerationRequest(prompt_ids, self.sampling_params(params))
            finish: FinishEvent | None = None
            async for event in engine.stream(request):
                if isinstance(event, ErrorEvent):
                    raise GenerationError(event.message)
                if isinstance(event, FinishEvent):
                    finish = event
        finally:
            self._release()
        assert finish is not None
        self.metrics.observe_generation(
            finish.prompt_tokens,
            finish.generated_tokens,
            finish.queue_seconds,
            finish.first_token_seconds,
            time.perf_counter() - started + finish.queue_seconds,
        )
        text = body.inputs + finish.generated_text if params.return_full_text else finish.generated_text
        details = None
        if params.details:
            details = Details(
                finish_reason=finish.finish_reason,
                generated_tokens=finish.generated_tokens,
                prompt_tokens=finish.prompt_tokens,
                seed=finish.seed,
            )
        return GenerateResponse(generated_text=text, details=details)

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
        }
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
