"""OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models): requests mapped to `SamplingParams`,
responses and stream chunks in OpenAI's shapes."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from app.api.streaming import render
from app.engine.engine import EventStream
from app.engine.events import Finish, FinishReason, Generation, PromptEvent, PromptToken, TokenEvent, TokenLogprob
from app.engine.sampling import SamplingParams
from app.modes import openai_model_names, precision_of_model_field
from app.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIFinishReason,
    SamplingFields,
    Usage,
)
from app.service import ModelService

STREAM_END = "[DONE]"  # OpenAI's last Server-Sent Event
FINISH_REASONS: dict[FinishReason, OpenAIFinishReason] = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def sampling_params(
    body: SamplingFields, max_new_tokens: int, top_logprobs: int = 0, prompt_logprobs: int | None = None
) -> SamplingParams:
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
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
    )


class OpenAIApi:
    def __init__(self, service: ModelService, note_precision: Callable[[str], None] | None = None) -> None:
        self.service = service
        self._note_precision = note_precision

    def models(self) -> ModelList:
        """One entry per served mode, `<model-id>:<mode>`, the default first."""
        names = openai_model_names(self.service.model_name, self.service.served_precisions)
        return ModelList(data=[ModelCard(id=name, created=self.service.started_at) for name in names])

    def _precision(self, body: SamplingFields) -> str:
        """The mode `model` names (422 for a mode not served); the request's metrics are labelled with it."""
        precision = precision_of_model_field(body.model, self.service.model_name, self.service.served_precisions)
        if self._note_precision is not None:
            self._note_precision(precision)
        return precision

    def _head(self, prefix: str, body: SamplingFields) -> dict[str, Any]:
        """The fields every response and chunk of one request shares; `model` as the request named it."""
        model = self.service.model_name
        if body.model is not None and ":" in body.model:
            model = f"{model}:{self._precision(body)}"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}

    # --- /v1/completions ------------------------------------------------------
    async def _open_completion(self, body: CompletionRequest) -> list[EventStream]:
        precision = self._precision(body)
        prompts = [
            await self.service.tokenize(p, precision)
            if isinstance(p, str)
            else self.service.check_token_ids(p, precision)
            for p in body.prompts
        ]
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        # the prompt's log-probs (logits at every prompt position) only for `echo` with `logprobs`
        prompt_logprobs = body.logprobs if body.echo else None
        params = sampling_params(body, max_tokens, body.logprobs or 0, prompt_logprobs)
        return self.service.open(prompts, params, precision)

    def _prompt_texts(self, body: CompletionRequest) -> list[str]:
        """What `echo` puts before each completion: the prompt's text (decoded when given as token ids)."""
        return [p if isinstance(p, str) else self.service.decode(p) for p in body.prompts] if body.echo else []

    async def completion(self, body: CompletionRequest) -> CompletionResponse:
        generations = await self.service.results(await self._open_completion(body))
        echoed = self._prompt_texts(body) or [""] * len(generations)
        choices = []
        for i, (prompt_text, generation) in enumerate(zip(echoed, generations, strict=True)):
            logprobs = None
            if body.logprobs is not None:
                prompt = generation.prompt.tokens if generation.prompt is not None else []
                logprobs = completion_logprobs(prompt, generation.tokens, generated_start=len(prompt_text))
            choices.append(
                CompletionChoice(
                    index=i,
                    text=prompt_text + generation.finish.generated_text,
                    logprobs=logprobs,
                    finish_reason=FINISH_REASONS[generation.finish.finish_reason],
                )
            )
        return CompletionResponse(**self._head("cmpl", body), choices=choices, usage=usage(generations))

    async def completion_stream(self, body: CompletionRequest) -> AsyncIterator[str]:
        streams = await self._open_completion(body)
        chunks = _CompletionChunks(body, self._prompt_texts(body), self._head("cmpl", body))
        return render(streams, chunks, done=STREAM_END)

    # --- /v1/chat/completions -------------------------------------------------
    async def _open_chat(self, body: ChatCompletionRequest) -> list[EventStream]:
        # "developer" is the newer name of "system"; chat templates know only the latter.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        precision = self._precision(body)
        prompt_ids = await self.service.chat_prompt_ids(messages, precision)
        budget = body.token_budget or max(self.service.settings.max_total_tokens - len(prompt_ids), 1)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        return self.service.open([prompt_ids], sampling_params(body, budget, top), precision)

    async def chat_completion(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        [generation] = await self.service.results(await self._open_chat(body))
        finish = generation.finish
        choice = ChatChoice(
            index=0,
            message=AssistantMessage(content=finish.generated_text),
            logprobs=ChatLogprobs(content=[chat_logprob(t) for t in generation.tokens]) if body.logprobs else None,
            finish_reason=FINISH_REASONS[finish.finish_reason],
        )
        return ChatCompletionResponse(**self._head("chatcmpl", body), choices=[choice], usage=usage([generation]))

    async def chat_completion_stream(self, body: ChatCompletionRequest) -> AsyncIterator[str]:
        streams = await self._open_chat(body)
        return render(streams, _ChatChunks(body, self._head("chatcmpl", body)), done=STREAM_END)


def usage(ended: list[Finish] | list[Generation]) -> Usage:
    finishes = [g.finish if isinstance(g, Generation) else g for g in ended]
    prompt = sum(f.prompt_tokens for f in finishes)
    completion = sum(f.generated_tokens for f in finishes)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _top_dict(chosen_text: str, chosen_logprob: float, top: list[TokenLogprob]) -> dict[str, float]:
    """OpenAI's legacy `top_logprobs` entry: the most likely tokens, and the chosen one (so up to N + 1).

    Keyed by text, as OpenAI's: tokens that decode alike (partial UTF-8 bytes all read "\ufffd")
    share one key, which keeps the most likely of them.
    """
    entry: dict[str, float] = {}
    for token in top:  # best first: setdefault keeps the highest
        entry.setdefault(token.text, token.logprob)
    entry.setdefault(chosen_text, chosen_logprob)
    return entry


def completion_logprobs(
    prompt: list[PromptToken], generated: list[TokenEvent], generated_start: int
) -> CompletionLogprobs:
    """The legacy `logprobs` of echoed prompt tokens (may be none), then generated ones.

    Text offsets: the prompt's tokens count from 0, the generated ones from `generated_start`
    (where the completion begins in the choice's text: after the echoed prompt).
    """
    logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = 0
    for token in prompt:
        logprobs.tokens.append(token.text)
        logprobs.token_logprobs.append(token.logprob)
        top = None if token.logprob is None else _top_dict(token.text, token.logprob, token.top_logprobs)
        logprobs.top_logprobs.append(top)
        logprobs.text_offset.append(offset)
        offset += len(token.text)
    offset = generated_start
    for event in generated:
        logprobs.tokens.append(event.text)
        logprobs.token_logprobs.append(event.logprob)
        logprobs.top_logprobs.append(_top_dict(event.text, event.logprob, event.top_logprobs))
        logprobs.text_offset.append(offset)
        offset += len(event.text)
    return logprobs


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprob(event: TokenEvent) -> ChatTokenLogprob:
    return ChatTokenLogprob(
        token=event.text,
        logprob=event.logprob,
        bytes=_utf8(event.text),
        top_logprobs=[ChatTopLogprob(token=t.text, logprob=t.logprob, bytes=_utf8(t.text)) for t in event.top_logprobs],
    )


class _CompletionChunks:
    """Text chunks per prompt (echoed prompts first); the usage chunk last when asked.

    With `logprobs` every generated token gets its own chunk (its text may be empty while a stop
    sequence is pending), and an echoed prompt comes with its tokens' log-probs once it is prefilled.
    """

    def __init__(self, body: CompletionRequest, prompt_texts: list[str], head: dict[str, Any]) -> None:
        self.body, self.prompt_texts, self.head = body, prompt_texts, head
        self.scored_echo = body.echo and body.logprobs is not None
        self.offsets = [len(t) for t in prompt_texts] or [0] * len(body.prompts)  # next text offset per choice

    def _chunk(
        self,
        index: int,
        text: str,
        reason: OpenAIFinishReason | None = None,
        logprobs: CompletionLogprobs | None = None,
    ) -> str:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
        return CompletionResponse(**self.head, choices=[choice]).model_dump_json()

    def opening(self) -> list[str]:
        if not self.body.echo or self.scored_echo:
            return []
        return [self._chunk(i, prompt) for i, prompt in enumerate(self.prompt_texts)]

    def prompt(self, index: int, event: PromptEvent) -> list[str]:
        reason = None if event.finish is None else FINISH_REASONS[event.finish.finish_reason]
        if self.scored_echo:
            logprobs = completion_logprobs(event.tokens, [], generated_start=0)
            return [self._chunk(index, self.prompt_texts[index], reason, logprobs)]
        return [self._chunk(index, "", reason)] if reason is not None else []

    def token(self, index: int, event: TokenEvent) -> list[str]:
        reason = None if event.finish is None else FINISH_REASONS[event.finish.finish_reason]
        if self.body.logprobs is not None:
            logprobs = completion_logprobs([], [event], generated_start=self.offsets[index])
            self.offsets[index] += len(event.text)
            return [self._chunk(index, event.visible_text, reason, logprobs)]
        if reason is not None:
            return [self._chunk(index, event.visible_text, reason)]
        return [self._chunk(index, event.visible_text)] if event.visible_text else []

    def closing(self, finishes: list[Finish]) -> list[str]:
        if not self.body.include_usage:
            return []
        return [CompletionResponse(**self.head, choices=[], usage=usage(finishes)).model_dump_json()]


class _ChatChunks:
    """The assistant's role first, then content deltas, a finish chunk, and the usage chunk when asked."""

    def __init__(self, body: ChatCompletionRequest, head: dict[str, Any]) -> None:
        self.body, self.head = body, head

    def _chunk(
        self, delta: ChatDelta, reason: OpenAIFinishReason | None = None, logprobs: ChatLogprobs | None = None
    ) -> str:
        choice = ChatChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=reason)
        return ChatCompletionChunk(**self.head, choices=[choice]).model_dump_json()

    def opening(self) -> list[str]:
        return [self._chunk(ChatDelta(role="assistant", content=""))]

    def prompt(self, index: int, event: PromptEvent) -> list[str]:
        return []  # chat never asks for the prompt's log-probs and always generates

    def token(self, index: int, event: TokenEvent) -> list[str]:
        if self.body.logprobs:  # every token its chunk, with its log-probs
            logprobs = ChatLogprobs(content=[chat_logprob(event)])
            payloads = [self._chunk(ChatDelta(content=event.visible_text), logprobs=logprobs)]
        else:
            payloads = [self._chunk(ChatDelta(content=event.visible_text))] if event.visible_text else []
        if event.finish is not None:
            payloads.append(self._chunk(ChatDelta(), FINISH_REASONS[event.finish.finish_reason]))
        return payloads

    def closing(self, finishes: list[Finish]) -> list[str]:
        if not self.body.include_usage:
            return []
        return [ChatCompletionChunk(**self.head, choices=[], usage=usage(finishes)).model_dump_json()]
