"""TGI's API (/generate, /generate_stream): its request mapped to `SamplingParams`, its response shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from app.api.streaming import render
from app.engine.engine import EventStream
from app.engine.events import Finish, Generation, PromptEvent, TokenEvent, TokenLogprob
from app.engine.sampling import SamplingParams
from app.errors import InputValidationError
from app.modes import resolve_precision
from app.schemas import (
    Details,
    GenerateDetails,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamResponse,
    StreamToken,
)
from app.service import ModelService


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
        top_logprobs=p.top_n_tokens or 0,
        prompt_logprobs=0 if p.decoder_input_details else None,
    )


class TgiApi:
    def __init__(self, service: ModelService, note_precision: Callable[[str], None] | None = None) -> None:
        self.service = service
        self._note_precision = note_precision

    async def _open(self, body: GenerateRequest) -> list[EventStream]:
        precision = resolve_precision(body.parameters.precision, self.service.served_precisions, "precision")
        if self._note_precision is not None:
            self._note_precision(precision)
        prompt_ids = await self.service.tokenize(body.inputs, precision)
        return self.service.open([prompt_ids], sampling_params(body.parameters), precision)

    async def generate(self, body: GenerateRequest) -> GenerateResponse:
        [generation] = await self.service.results(await self._open(body))
        return GenerateResponse(
            generated_text=_text(body, generation.finish), details=_generate_details(body, generation)
        )

    async def generate_stream(self, body: GenerateRequest) -> AsyncIterator[str]:
        """Admit the request now (errors become HTTP statuses), then stream TGI's events as JSON."""
        if body.parameters.decoder_input_details:  # as TGI: the prompt's details come only in a whole response
            raise InputValidationError("parameters.decoder_input_details is not supported when streaming tokens")
        return render(await self._open(body), _TgiEvents(body))


class _TgiEvents:
    """One `StreamResponse` per token; the last carries the generated text (and details when asked)."""

    def __init__(self, body: GenerateRequest) -> None:
        self.body = body

    def opening(self) -> list[str]:
        return []

    def prompt(self, index: int, event: PromptEvent) -> list[str]:
        return []  # never asked for: decoder_input_details is refused when streaming, and max_new_tokens >= 1

    def token(self, index: int, event: TokenEvent) -> list[str]:
        response = StreamResponse(
            index=event.index, token=_token(event), top_tokens=[_alternative(t) for t in event.top_logprobs]
        )
        if event.finish is not None:
            response.generated_text = _text(self.body, event.finish)
            response.details = _details(self.body, event.finish)
        return [response.model_dump_json()]

    def closing(self, finishes: list[Finish]) -> list[str]:
        return []


def _token(event: TokenEvent) -> StreamToken:
    return StreamToken(id=event.id, text=event.text, logprob=event.logprob, special=event.special)


def _alternative(token: TokenLogprob) -> StreamToken:
    return StreamToken(id=token.id, text=token.text, logprob=token.logprob, special=token.special)


def _text(body: GenerateRequest, finish: Finish) -> str:
    return body.inputs + finish.generated_text if body.parameters.return_full_text else finish.generated_text


def _details(body: GenerateRequest, finish: Finish) -> Details | None:
    if not body.parameters.details:
        return None
    return Details(
        finish_reason=finish.finish_reason.value,
        generated_tokens=finish.generated_tokens,
        prompt_tokens=finish.prompt_tokens,
        seed=finish.seed,
    )


def _generate_details(body: GenerateRequest, generation: Generation) -> GenerateDetails | None:
    """TGI's details of a whole response: asked by `details`, or by `decoder_input_details` (as TGI does)."""
    parameters = body.parameters
    if not (parameters.details or parameters.decoder_input_details):
        return None
    finish = generation.finish
    prompt = generation.prompt.tokens if generation.prompt is not None else []
    return GenerateDetails(
        finish_reason=finish.finish_reason.value,
        generated_tokens=finish.generated_tokens,
        prompt_tokens=finish.prompt_tokens,
        seed=finish.seed,
        prefill=[PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in prompt],
        tokens=[_token(t) for t in generation.tokens],
        top_tokens=None
        if parameters.top_n_tokens is None
        else [[_alternative(a) for a in t.top_logprobs] for t in generation.tokens],
    )
