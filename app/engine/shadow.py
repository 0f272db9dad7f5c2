"""Shadow scoring: how far a served mode's answers are from a reference mode's, on live traffic.

A sampled share of finished requests (QS_SHADOW_SAMPLE) keeps, while it is served, the logits
each generated token was chosen from. When it ends, the engine hands prompt, tokens and logits
to `ShadowScorer.offer`; the scorer's own thread replays prompt + generated tokens as ONE
teacher-forced forward on the reference model and compares, per generated token:

- the KL divergence KL(reference || served) of the two next-token distributions;
- top-1 agreement: whether both put the same token first;
- and per answer, the first position where the served token is not the reference's greedy choice.

The replay runs only in its turn of the process's `FairShare`, with a small weight, so under
load it gets at most that share of the CPU and otherwise the idle time. Offers beyond a short
queue are dropped, and a replay that fails is counted and dropped: neither reaches a client.
`score_replay` is also what the offline twin (`tools.quality --replay`) uses.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.fair_share import FairShare

log = logging.getLogger(__name__)

SHADOW = "shadow"  # the scorer's name in the FairShare
# Finished answers waiting for their replay; beyond this they are dropped (and counted): a
# backlog would hold every kept logits row in memory and report on traffic long gone.
QUEUE_SIZE = 16


@dataclass(frozen=True)
class ReplayScore:
    kl_per_token: list[float]  # KL(reference || served) of each generated token's distribution, nats
    top1_agreements: int  # tokens whose argmax is the same in both
    first_divergence: int | None  # first generated token that is not the reference's greedy choice; None: none

    @property
    def tokens(self) -> int:
        return len(self.kl_per_token)


def score_replay(served_logits: torch.Tensor, reference_logits: torch.Tensor, generated: list[int]) -> ReplayScore:
    """Compare [n, vocab] logits of the served mode and the reference for the n generated tokens."""
    if served_logits.shape != reference_logits.shape or served_logits.shape[0] != len(generated):
        raise ValueError(
            f"logits {tuple(served_logits.shape)} and {tuple(reference_logits.shape)} do not match "
            f"{len(generated)} generated tokens"
        )
    served = F.log_softmax(served_logits.float(), dim=-1)
    reference = F.log_softmax(reference_logits.float(), dim=-1)
    if torch.isnan(served).any() or torch.isnan(reference).any():
        raise ValueError("the logits hold NaN")
    # KL(p || q) = sum p (log p - log q); `kl_div` takes log q first and treats 0 · log 0 as 0
    kl = F.kl_div(served, reference, log_target=True, reduction="none").sum(-1).clamp_min(0.0)
    reference_top = reference.argmax(-1)
    agreements = int((served.argmax(-1) == reference_top).sum())
    differs = (reference_top != torch.tensor(generated, device=reference_top.device)).nonzero()
    first = int(differs[0, 0]) if len(differs) else None
    return ReplayScore(kl.tolist(), agreements, first)


@torch.inference_mode()
def reference_logits(model: nn.Module, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """The reference's logits for each generated token given what came before it: one forward of the
    prompt and the generated tokens but the last, keeping the last len(generated) positions."""
    device = next(model.parameters()).device
    ids = torch.tensor([[*prompt_ids, *generated[:-1]]], device=device)
    out = model(input_ids=ids, use_cache=False, logits_to_keep=len(generated))
    return out.logits[0, -len(generated) :].float()


class ShadowObserver(Protocol):
    """Where the scorer reports, per served mode (`app.metrics.ServiceMetrics` is one)."""

    def observe_shadow(
        self, reference: str, kl_per_token: list[float], top1_agreements: int, first_divergence: int | None
    ) -> None: ...

    def count_shadow(self, reference: str, outcome: str) -> None: ...


@dataclass
class _Replay:
    observer: ShadowObserver
    prompt_ids: list[int]
    generated: list[int]
    served_logits: torch.Tensor


class ShadowScorer:
    """Replays sampled answers on the reference model, on its own thread, in its FairShare turns."""

    def __init__(
        self, reference: str, model: nn.Module, share: FairShare, weight: float, queue_size: int = QUEUE_SIZE
    ) -> None:
        self.reference = reference
        self.model = model
        self._share = share
        share.join(SHADOW, weight, background=True)
        self._queue: queue.Queue[_Replay | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name="shadow-scorer", daemon=True)
        self.scored = 0  # replays scored, failed and dropped: for logs and tests
        self.failed = 0
        self.dropped = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # the worker is busy with a backlog: it is a daemon, leave it
            return
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def offer(
        self, observer: ShadowObserver, prompt_ids: list[int], generated: list[int], logits: torch.Tensor
    ) -> None:
        """Queue a finished answer for its replay (the engine's worker calls this); never blocks."""
        try:
            self._queue.put_nowait(_Replay(observer, prompt_ids, generated, logits))
        except queue.Full:
            self.dropped += 1
            observer.count_shadow(self.reference, "dropped")

    def idle(self) -> bool:
        """No replay waits (one may still be running)."""
        return self._queue.empty()

    def _work(self) -> None:
        while (replay := self._queue.get()) is not None:
            try:
                with self._share.turn(SHADOW):
                    score = score_replay(
                        replay.served_logits,
                        reference_logits(self.model, replay.prompt_ids, replay.generated),
                        replay.generated,
                    )
            except Exception as error:  # counted and dropped: a replay never fails a client
                self.failed += 1
                log.warning("shadow replay on %s failed: %s: %s", self.reference, type(error).__name__, error)
                replay.observer.count_shadow(self.reference, "failed")
            else:
                self.scored += 1
                replay.observer.observe_shadow(
                    self.reference, score.kl_per_token, score.top1_agreements, score.first_divergence
                )
            finally:
                self._queue.task_done()

    def join_queue(self) -> None:
        """Wait until every offered replay was scored or failed (tests, benchmarks)."""
        self._queue.join()
