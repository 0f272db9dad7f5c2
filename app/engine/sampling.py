"""Next-token choice from one row of logits: greedy or sampled, with TGI's parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# Below this, dividing by the temperature overflows float32 logits; it means greedy anyway (as in vLLM).
GREEDY_TEMPERATURE = 1e-5


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


def choose_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor,
) -> tuple[int, float]:
    """Return (token id, its log-probability under the final distribution) for a 1-D logits row."""
    with one_intra_op_thread():
        return _choose_token(logits, params, generator, seen)


def _choose_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor,
) -> tuple[int, float]:
    logits = logits.float()
    if torch.isnan(logits).any():  # argmax would pick a NaN as the largest: a token from garbage
        raise ValueError("the model's logits for this sequence contain NaN")
    if params.repetition_penalty is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.sampling:
        logits = warp(logits, params)
    # An extreme penalty can push logits to +-inf, and inf - inf is NaN in the softmax.
    logits = logits.clamp(-torch.finfo(logits.dtype).max, torch.finfo(logits.dtype).max)
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.sampling:
        token = int(torch.multinomial(logprobs.exp(), 1, generator=generator).item())
    else:
        token = int(torch.argmax(logits).item())
    return token, float(logprobs[token].item())
