"""The output processor: from a row of logits to the sequence's next `TokenEvent`
(and from a prompt's logits to its `PromptEvent`, when the request asks).

Each sequence keeps its own sampling state (seeded generator, the tokens the
repetition penalty looks at), detokenizer and stop matcher; the processor
chooses the token, turns it into text, and decides whether the sequence ends.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import torch

from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.events import Finish, FinishReason, PromptEvent, PromptToken, TokenEvent, TokenLogprob
from app.engine.sampling import TokenChoice, choose_token, one_intra_op_thread, prompt_logprobs
from app.engine.scheduler import GenerationRequest
from app.engine.stops import StopMatcher


class SamplingFailed(Exception):
    """Choosing the next token failed (the cause is chained); only this sequence is affected."""


class SequenceState:
    """Output-side state of one running sequence."""

    def __init__(self, request: GenerationRequest, tokenizer: Any, device: torch.device, admitted_at: float) -> None:
        params = request.params
        self.request = request
        self.admitted_at = admitted_at
        self.seed = params.seed
        self.generator: torch.Generator | None = None
        if params.sampling:
            self.seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        # prompt and output tokens, kept only when the repetition penalty needs them
        self.seen = list(request.prompt_ids) if params.repetition_penalty is not None else None
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.generated = 0
        self.last_token = -1
        self.first_token_at: float | None = None
        # the generated tokens and the logits each was chosen from, for a shadow replay (sampled requests only)
        self.kept_tokens: list[int] | None = [] if request.keep_logits else None
        self.kept_logits: list[torch.Tensor] = []


class OutputProcessor:
    """Samples, detokenizes, matches stop sequences and decides the finish, for any number of sequences."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int], device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.device = device
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []))
        self._no_tokens = torch.empty(0, dtype=torch.long, device=device)
        self._texts: dict[int, str] = {}  # token id -> its text decoded alone (top log-probs name many)

    def open(self, request: GenerationRequest, admitted_at: float) -> SequenceState:
        """The state of a sequence that was just admitted (its generator is seeded here)."""
        return SequenceState(request, self.tokenizer, self.device, admitted_at)

    def prompt(self, state: SequenceState, logits: torch.Tensor | None) -> PromptEvent:
        """The prompt's event from the logits of all its positions ([n, vocab]; None: no log-probs asked).

        A request that generates nothing (`max_new_tokens` 0) ends here.
        """
        params = state.request.params
        ids = state.request.prompt_ids
        tokens: list[PromptToken] = []
        if logits is not None:
            top = params.prompt_logprobs or 0
            scored = prompt_logprobs(logits, ids, top)
            logprobs: list[float | None] = [None, *scored.logprobs]
            alternatives = [[], *scored.top]
            tokens = [
                PromptToken(token, self.token_text(token), logprob, self._special(token), self._logprobs(pairs))
                for token, logprob, pairs in zip(ids, logprobs, alternatives, strict=True)
            ]
        event = PromptEvent(tokens)
        if params.max_new_tokens == 0:
            state.first_token_at = time.perf_counter()
            event.finish = self._finish(state, FinishReason.LENGTH)
        return event

    @staticmethod
    def kept_logits(state: SequenceState) -> torch.Tensor:
        """The logits each kept token was chosen from, [tokens, vocab] (on one thread, as above)."""
        with one_intra_op_thread():
            return torch.stack(state.kept_logits)

    def token_text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def _special(self, token: int) -> bool:
        return token in self._special_ids or token in self.eos_token_ids

    def _logprobs(self, pairs: list[tuple[int, float]]) -> list[TokenLogprob]:
        return [TokenLogprob(token, self.token_text(token), logprob, self._special(token)) for token, logprob in pairs]

    def process(self, state: SequenceState, logits: torch.Tensor) -> TokenEvent:
        """Choose the next token from a 1-D logits row and return its event, with `finish` set on the last one."""
        token, logprob, top = self._sample(state, logits)
        state.generated += 1
        state.last_token = token
        if state.kept_tokens is not None:  # a copy: a runner may reuse its logits buffer next step
            state.kept_tokens.append(token)
            # on one thread, as the sampling: a row is big enough for a parallel region, whose spinning
            # OpenMP worker would take a core from the next decode step (measured: keeping 5% of the
            # requests' logits this way made int4's steps 10% longer)
            with one_intra_op_thread():
                state.kept_logits.append(logits.detach().to(torch.float32, copy=True))
        state.first_token_at = state.first_token_at or time.perf_counter()
        if state.seen is not None:
            state.seen.append(token)
        params = state.request.params
        reason = None
        if token in self.eos_token_ids and not params.ignore_eos:
            text, visible, reason = "", state.stops.flush(), FinishReason.EOS_TOKEN
        else:
            text = state.detokenizer.push(token)
            visible = state.stops.push(text)
            if state.stops.stopped:
                reason = FinishReason.STOP_SEQUENCE
            elif state.generated >= params.max_new_tokens:
                visible += state.stops.flush()
                reason = FinishReason.LENGTH
        event = TokenEvent(state.generated - 1, token, text, visible, logprob, self._special(token))
        event.top_logprobs = self._logprobs(top)
        if reason is not None:
            event.finish = self._finish(state, reason)
        return event

    def _sample(self, state: SequenceState, logits: torch.Tensor) -> TokenChoice:
        seen = self._no_tokens if state.seen is None else torch.tensor(state.seen, device=self.device)
        params = state.request.params
        try:
            return choose_token(logits, params, state.generator, seen, params.top_logprobs)
        except Exception as error:
            raise SamplingFailed(str(error)) from error

    @staticmethod
    def _finish(state: SequenceState, reason: FinishReason) -> Finish:
        request = state.request
        arrived = request.enqueued_at
        return Finish(
            generated_text=state.stops.text,
            finish_reason=reason,
            generated_tokens=state.generated,
            prompt_tokens=len(request.prompt_ids),
            seed=state.seed,
            queue_seconds=state.admitted_at - arrived,
            first_token_seconds=(state.first_token_at or state.admitted_at) - arrived,
            total_seconds=time.perf_counter() - arrived,
        )
