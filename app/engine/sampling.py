"""Next-token choice from one row of logits: greedy or sampled, with TGI's parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

# Below this, dividing by the temperature overflows float32 logits; it means greedy anyway (as in vLLM).
GREEDY_TEMPERATURE = 1e-5
# Rows of prompt logits turned into log-probs at once (bounds the temporary to ~50 MB at a 49k vocabulary).
_PROMPT_CHUNK = 256


@dataclass
class SamplingParams:
    max_new_tokens: int = 20
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool = False
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    top_logprobs: int = 0  # most likely alternatives reported with each generated token
    # None: the prompt's log-probs are not computed (no logits for its positions); N: they are, with N alternatives
    prompt_logprobs: int | None = None

    @property
    def sampling(self) -> bool:
        """As in TGI: any warper turns sampling on; temperature 0 means greedy."""
        if self.temperature is not None and self.temperature < GREEDY_TEMPERATURE:
            return False
        warped = (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 0)
            or (self.top_p is not None and self.top_p < 1.0)
        )
        return self.do_sample or warped


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the sequence (prompt included)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering; filtered logits become -inf."""
    if params.temperature is not None and params.temperature > 0:
        logits = logits / params.temperature
    if params.top_k is not None and 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the block's torch ops on the calling thread alone.

    One row of logits is too little work for a parallel region, and the OpenMP workers such a
    region wakes then spin for milliseconds, taking the cores from the native decode step's
    own thread team (measured: int4 step 2.6 ms alone, 5.7 ms after a 2-thread sampling).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TokenChoice(NamedTuple):
    token: int
    logprob: float  # the token's log-probability under the raw logits (before penalty, temperature, filters)
    top: list[tuple[int, float]]  # the most likely (token, logprob) pairs of the raw distribution, best first


def choose_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor,
    top: int = 0,
) -> TokenChoice:
    """Choose the next token from a 1-D logits row; report log-probs of the raw logits, with `top` alternatives.

    The reported numbers are the model's (log-softmax of its logits), not the sampler's: vLLM's
    default, and what evaluation tools read. The penalty and the warpers only shape the choice.
    """
    with one_intra_op_thread():
        return _choose_token(logits, params, generator, seen, top)


def _choose_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor,
    top: int,
) -> TokenChoice:
    raw = logits.float()
    if torch.isnan(raw).any():  # argmax would pick a NaN as the largest: a token from garbage
        raise ValueError("the model's logits for this sequence contain NaN")
    logits = raw
    if params.repetition_penalty is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.sampling:
        logits = warp(logits, params)
        # An extreme penalty can push logits to +-inf, and inf - inf is NaN in the softmax.
        logits = logits.clamp(-torch.finfo(logits.dtype).max, torch.finfo(logits.dtype).max)
        token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).item())
    else:
        token = int(torch.argmax(logits).item())
    raw_logprobs = torch.log_softmax(raw, dim=-1)
    return TokenChoice(token, float(raw_logprobs[token].item()), most_likely(raw_logprobs, top))


def most_likely(logprobs: torch.Tensor, count: int) -> list[tuple[int, float]]:
    """The `count` highest (token, logprob) pairs of a 1-D row, best first."""
    if count <= 0:
        return []
    values, ids = torch.topk(logprobs, min(count, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


@dataclass
class PromptLogprobs:
    logprobs: list[float]  # of each prompt token after the first, given the ones before it
    top: list[list[tuple[int, float]]]  # per such token: its most likely alternatives, best first


def prompt_logprobs(logits: torch.Tensor, token_ids: list[int], top: int) -> PromptLogprobs:
    """Log-probs of the prompt's tokens 1..n-1 from the logits of positions 0..n-2 ([n, vocab] given)."""
    targets = torch.tensor(token_ids[1:], dtype=torch.long, device=logits.device)
    result = PromptLogprobs([], [])
    for begin in range(0, len(targets), _PROMPT_CHUNK):  # a whole prompt's rows: worth all intra-op threads
        chunk = targets[begin : begin + _PROMPT_CHUNK]
        rows = torch.log_softmax(logits[begin : begin + len(chunk)].float(), dim=-1)
        result.logprobs.extend(rows.gather(-1, chunk[:, None])[:, 0].tolist())
        if top > 0:
            values, ids = torch.topk(rows, min(top, rows.shape[-1]), dim=-1)
            result.top.extend(list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    if top <= 0:
        result.top = [[] for _ in result.logprobs]
    return result
