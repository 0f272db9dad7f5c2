"""TGI's API (/generate, /generate_stream): its request mapped to `SamplingParams`, its response shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from app.api.streaming import render
from app.engine.engine import EventStream
from app.engine.events import Finish, TokenEvent
from app.engine.sampling import SamplingParams
from app.schemas import Details, GenerateParameters, GenerateRequest, GenerateResponse, StreamResponse, StreamToken
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
    )


class TgiApi:
    def __init__(self, service: ModelService) -> None:
        self.service = service

    async def _open(self, body: GenerateRequest) -> list[EventStream]:
        prompt_ids = await self.service.tokenize(body.inputs)
        return self.service.open([prompt_ids], sampling_params(body.parameters))

    async def generate(self, body: GenerateRequest) -> GenerateResponse:
        [finish] = await self.service.results(await self._open(body))
        return GenerateResponse(generated_text=_text(body, finish), details=_details(body, finish))

    async def generate_stream(self, body: GenerateRequest) -> AsyncIterator[str]:
        """Admit the request now (errors become HTTP statuses), then stream TGI's events as JSON."""
        return render(await self._open(body), _TgiEvents(body))


class _TgiEvents:
    """One `StreamResponse` per token; the last carries the generated text (and details when asked)."""

    def __init__(self, body: GenerateRequest) -> None:
        self.body = body

    def opening(self) -> list[str]:
        return []

    def token(self, index: int, event: TokenEvent) -> list[str]:
        token = StreamToken(id=event.id, text=event.text, logprob=event.logprob, special=event.special)
        response = StreamResponse(index=event.index, token=token)
        if event.finish is not None:
            response.generated_text = _text(self.body, event.finish)
            response.details = _details(self.body, event.finish)
        return [response.model_dump_json()]

    def closing(self, finishes: list[Finish]) -> list[str]:
        return []


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
