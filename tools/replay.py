"""The offline twin of shadow scoring: replay your own traffic sample through every mode.

    python -m tools.quality --replay traffic.jsonl --modes int8,int4
    quantserve-eval --replay traffic.jsonl --modes all --max-new-tokens 64

Each line of the JSONL file is one request, as a client sent it: `{"prompt": "..."}` (OpenAI
completions), `{"inputs": "..."}` (TGI) or `{"messages": [{"role": ..., "content": ...}]}`
(OpenAI chat: the model's chat template is applied), with an optional `max_tokens` /
`max_new_tokens`. Every mode answers every request greedily through the server's own engine
(the same runner, batch and sampling code), keeping the logits it chose each token from;
each answer is then replayed as one teacher-forced forward on the reference mode and scored
with the very function the live shadow scorer uses (`app.engine.shadow.score_replay`): the
per-token KL divergence, top-1 agreement, and where the answer first leaves the reference's
greedy path. Real traffic, not WikiText, is what decides a deployment.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.engine.engine import Engine, GenerationRequest
from app.engine.runner import make_runner
from app.engine.sampling import SamplingParams
from app.engine.shadow import ReplayScore, reference_logits, score_replay
from app.model_loader import eos_token_ids
from app.modes import ModeLoader
from app.settings import load_settings
from quant.registry import REFERENCE_MODE

BATCH = 8


@dataclass(frozen=True)
class TrafficRequest:
    """One line of the traffic sample: its text, or its chat messages, and its token budget."""

    text: str | None
    messages: list[dict[str, str]] | None
    max_new_tokens: int | None


@dataclass
class ReplayResult:
    """One mode's answers to the traffic sample, scored against the reference."""

    mode: str
    reference: str
    answers: int = 0
    tokens: int = 0
    top1_agreement: float = 0.0
    mean_kl: float = 0.0
    p95_kl: float = 0.0
    diverged_answers: int = 0  # answers with a token the reference would not have chosen greedily
    median_first_divergence: float | None = None
    seconds: float = 0.0
    scores: list[ReplayScore] = field(default_factory=list, repr=False)

    def add(self, score: ReplayScore) -> None:
        self.scores.append(score)

    def summarize(self) -> None:
        kl = sorted(v for s in self.scores for v in s.kl_per_token)
        self.answers, self.tokens = len(self.scores), len(kl)
        self.top1_agreement = sum(s.top1_agreements for s in self.scores) / max(self.tokens, 1)
        self.mean_kl = sum(kl) / max(len(kl), 1)
        self.p95_kl = kl[min(int(0.95 * len(kl)), len(kl) - 1)] if kl else 0.0
        firsts = [s.first_divergence for s in self.scores if s.first_divergence is not None]
        self.diverged_answers = len(firsts)
        self.median_first_divergence = statistics.median(firsts) if firsts else None


def read_traffic(path: Path) -> list[TrafficRequest]:
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        text = item.get("prompt", item.get("inputs"))
        messages = item.get("messages")
        if not (isinstance(text, str) and text) and not (isinstance(messages, list) and messages):
            raise ValueError(f"{path}:{number}: needs a non-empty `prompt`, `inputs` or `messages`")
        budget = item.get("max_new_tokens", item.get("max_tokens"))
        if budget is None:
            budget = (item.get("parameters") or {}).get("max_new_tokens")
        requests.append(TrafficRequest(text if messages is None else None, messages, budget))
    if not requests:
        raise ValueError(f"{path} holds no request")
    return requests


def prompt_ids(tokenizer: Any, request: TrafficRequest) -> list[int]:
    """Tokens as the server makes them: raw text with the tokenizer's specials, chat through its template."""
    if request.messages is not None:
        text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(request.text)["input_ids"]


def replay(
    traffic: list[TrafficRequest],
    modes: list[str],
    *,
    reference: str = REFERENCE_MODE,
    max_new_tokens: int = 64,
    **settings: Any,
) -> list[ReplayResult]:
    """Answer every request in every mode (greedy, the server's engine), and score each answer on `reference`."""
    compared = [m for m in dict.fromkeys(modes) if m != reference]
    base = load_settings(precision=",".join([reference, *compared]), **settings)
    loader = ModeLoader(len(compared) + 1)
    reference_model = loader(base.for_mode(reference))
    tokenizer = reference_model.tokenizer
    prompts = [prompt_ids(tokenizer, r) for r in traffic]
    budgets = [min(r.max_new_tokens or max_new_tokens, max_new_tokens) for r in traffic]
    max_len = max(len(p) + b for p, b in zip(prompts, budgets, strict=True))
    results = []
    for mode in compared:
        loaded = loader(base.for_mode(mode))
        result = ReplayResult(mode, reference)
        started = time.perf_counter()

        def score(prompt: list[int], generated: list[int], logits: torch.Tensor, result: ReplayResult = result) -> None:
            result.add(score_replay(logits, reference_logits(reference_model.model, prompt, generated), generated))

        engine = Engine(
            make_runner(loaded.model, loaded.device, BATCH, max_len),
            loaded.tokenizer,
            eos_token_ids(loaded),
            loaded.device,
            max_batch_size=BATCH,
            max_queue=len(prompts),
            on_replay=score,
        )
        for ids, budget in zip(prompts, budgets, strict=True):
            request = GenerationRequest(ids, SamplingParams(max_new_tokens=budget), keep_logits=True)
            engine.submit(request, lambda event: None)
        engine.run_until_idle()
        if engine.failure is not None:
            raise RuntimeError(f"{mode}: the engine failed: {engine.failure}")
        result.seconds = time.perf_counter() - started
        result.summarize()
        results.append(result)
        del engine, loaded
    return results


def format_table(results: list[ReplayResult]) -> str:
    header = (
        "| mode | vs | answers | tokens | top-1 agreement | mean KL (nats) | p95 KL | answers leaving the "
        "reference's greedy path | median first divergence | s |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        median = "-" if r.median_first_divergence is None else f"{r.median_first_divergence:g}"
        lines.append(
            f"| {r.mode} | {r.reference} | {r.answers} | {r.tokens} | {100 * r.top1_agreement:.2f}% "
            f"| {r.mean_kl:.4f} | {r.p95_kl:.4f} | {r.diverged_answers}/{r.answers} | {median} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def to_json(results: list[ReplayResult]) -> str:
    return json.dumps([{k: v for k, v in asdict(r).items() if k != "scores"} for r in results], indent=2)
