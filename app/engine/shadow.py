"""Shadow scoring: how far a served mode's answers are from a reference mode's, on live traffic.

A sampled share of finished requests (QS_SHADOW_SAMPLE) keeps, while it is served, the logits
each generated token was chosen from. When it ends, the engine hands prompt, tokens and logits
to `ShadowScorer.offer`; the scorer's own thread replays prompt + generated tokens as a
teacher-forced forward on the reference model and compares, per generated token:

- the KL divergence KL(reference || served) of the two next-token distributions;
- top-1 agreement: whether both put the same token first;
- and per answer, the first position where the served token is not the reference's greedy choice.

The replay runs only in turns of the process's `FairShare`, with a small weight, so under
load it gets at most that share of the CPU and otherwise the idle time. It goes in chunks of
`REPLAY_CHUNK_TOKENS` positions over a KV cache, one turn each: a whole replay (a forward of
the prompt and the answer, 0.3 s or more in fp32 here for long ones) would be one turn the served
engines wait through whole, so the share would be kept only on average and a long replay would
stall every request in flight for as long; a chunk bounds that stall. Offers beyond a short
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
# Positions of a replay per fair-share turn: the longest a served step waits behind the scorer.
# Each forward costs ~60 ms before its first position (the fp32 weights streamed once, small-M
# GEMMs) and ~1.2 ms per position after it (default model, 2 cores, Xeon): chunks of 32 made a
# replay cost twice what one forward does, so at 5% sampling the scorer needed ~8% of the CPU
# and was always behind. 128 positions (~0.2 s) hold most answers in one or two turns.
REPLAY_CHUNK_TOKENS = 128


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


class ReferenceReplay:
    """The reference's logits for each generated token given what came before it, computed as a
    forward of the prompt and the generated tokens but the last (the positions from len(prompt) - 1
    on predict the generated tokens), `chunk_tokens` positions per `step` over a KV cache."""

    def __init__(self, model: nn.Module, prompt_ids: list[int], generated: list[int], chunk_tokens: int) -> None:
        from transformers import DynamicCache

        if not generated or chunk_tokens < 1:
            raise ValueError("a replay needs generated tokens and chunks of at least one position")
        self._model = model
        device = next(model.parameters()).device
        self._ids = torch.tensor([[*prompt_ids, *generated[:-1]]], device=device)
        self._first_kept = self._ids.shape[1] - len(generated)  # the position that predicted generated[0]
        self._chunk = chunk_tokens
        self._cache = DynamicCache(config=model.config)
        self._done = 0
        self._rows: list[torch.Tensor] = []

    @property
    def finished(self) -> bool:
        return self._done == self._ids.shape[1]

    @torch.inference_mode()
    def step(self) -> None:
        """Run the next chunk of positions."""
        start = self._done
        end = min(start + self._chunk, self._ids.shape[1])
        kept = end - max(start, self._first_kept)  # positions of this chunk that predict a generated token
        # transformers keeps every position for logits_to_keep=0: keep 1 and drop it
        out = self._model(
            input_ids=self._ids[:, start:end], past_key_values=self._cache, use_cache=True, logits_to_keep=max(kept, 1)
        )
        if kept > 0:
            self._rows.append(out.logits[0, -kept:].float())
        self._done = end

    def logits(self) -> torch.Tensor:
        """[len(generated), vocab], once `finished`."""
        if not self.finished:
            raise RuntimeError("the replay has positions left")
        return torch.cat(self._rows)


def reference_logits(
    model: nn.Module, prompt_ids: list[int], generated: list[int], chunk_tokens: int | None = None
) -> torch.Tensor:
    """The whole replay at once (the offline twin), or chunk by chunk: the same logits."""
    replay = ReferenceReplay(model, prompt_ids, generated, chunk_tokens or len(prompt_ids) + len(generated))
    while not replay.finished:
        replay.step()
    return replay.logits()


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
        self,
        reference: str,
        model: nn.Module,
        share: FairShare,
        weight: float,
        queue_size: int = QUEUE_SIZE,
        chunk_tokens: int = REPLAY_CHUNK_TOKENS,
    ) -> None:
        self.reference = reference
        self.model = model
        self.chunk_tokens = chunk_tokens
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

    @property
    def pending(self) -> int:
        """Replays offered and not yet scored, failed or dropped (the one running included)."""
        return self._queue.unfinished_tasks

    def _replay(self, replay: _Replay) -> ReplayScore:
        """One replay, a fair-share turn per chunk (on the share's compute thread, where the engines'
        steps run too); the scoring goes in the last chunk's turn."""
        forward = ReferenceReplay(self.model, replay.prompt_ids, replay.generated, self.chunk_tokens)

        def chunk() -> ReplayScore | None:
            forward.step()
            if not forward.finished:
                return None
            return score_replay(replay.served_logits, forward.logits(), replay.generated)

        while (score := self._share.run(SHADOW, chunk)) is None:
            pass
        return score

    def _work(self) -> None:
        while (replay := self._queue.get()) is not None:
            try:
                score = self._replay(replay)
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
        self._queue.task_done()  # the stop sentinel

    def join_queue(self) -> None:
        """Wait until every offered replay was scored or failed (tests, benchmarks)."""
        self._queue.join()
