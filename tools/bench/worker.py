"""One benchmark job in its own process, so peak memory and allocator state never mix between modes.

`python -m tools.bench.worker SPEC_JSON` loads the model in one mode exactly as the
service does (`app.model_loader.load_model`), measures prefill and single-stream
decode through the engine's model runner, records the process's peak RSS, then
scores quality with `tools.quality`. It talks to the parent on stdout with lines
that start with `@@bench ` (JSON); everything else it prints is only logged.
(The llama.cpp peer rows need no worker: its own tools run as processes, `tools.bench.llamacpp`.)
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tools import quality
from tools.bench.results import BenchRow

PROTOCOL_PREFIX = "@@bench "


@dataclass(frozen=True)
class WorkerSpec:
    mode: str  # the precision mode
    model: str
    cache_dir: str
    device: str
    text: str | None  # quality text file; None: the quality tool's default text
    prompt_tokens: int  # prefill prompt length
    decode_tokens: int  # greedy decode steps, batch 1
    prefill_repeats: int  # best of N prefill runs (the machine is noisy)
    max_tokens: int  # quality token budget; 0 skips quality
    context: int  # quality window and stride, as in `tools.quality`
    stride: int
    reference_path: str | None  # fp32 predictions for the agreement score (its log-probs, for KL, beside it)
    is_reference: bool  # this job writes `reference_path` instead of reading it
    measure_speed: bool = True

    def empty_row(self) -> BenchRow:
        return BenchRow(self.mode)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def emit(event: str, **data: Any) -> None:
    print(PROTOCOL_PREFIX + json.dumps({"event": event, **data}), flush=True)


class Phases:
    """Announces each phase to the parent, remembers the current one (a failure names it) and times them."""

    def __init__(self) -> None:
        self.current = "start"
        self.seconds: dict[str, float] = {}
        self._started = time.perf_counter()

    def enter(self, name: str) -> None:
        self._close()
        self.current = name
        emit("phase", name=name)

    def _close(self) -> None:
        now = time.perf_counter()
        if self.current != "start":
            self.seconds[self.current] = now - self._started
        self._started = now

    def finish(self) -> dict[str, float]:
        self._close()
        return self.seconds


def peak_rss_bytes() -> int:
    from app.metrics import process_memory

    return process_memory().peak


def benchmark_text(spec: WorkerSpec) -> str:
    return quality.load_text(Path(spec.text) if spec.text else None)


def first_tokens(tokenizer: Any, text: str, count: int) -> list[int]:
    """The first `count` tokens of `text`, tokenized as the quality tool does."""
    ids = quality.tokenize(tokenizer, text, count).tolist()
    if len(ids) < count:
        raise ValueError(f"the text has only {len(ids)} tokens; {count} are needed")
    return ids


def measure_prefill(runner: Any, ids: list[int], repeats: int) -> float:
    """Best time of `repeats` prefills of `ids` (the minimum is the least noisy estimate)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        runner.prefill(0, ids)
        best = min(best, time.perf_counter() - started)
        runner.release(0)
    return best


def measure_decode(runner: Any, ids: list[int], steps: int) -> float:
    """Seconds for `steps` greedy decode steps at batch 1, sampling as the engine does (EOS ignored)."""
    from app.engine.sampling import SamplingParams, choose_token

    greedy = SamplingParams()
    seen = torch.tensor(ids, dtype=torch.long)
    logits = runner.prefill(0, ids)
    started = time.perf_counter()
    for _ in range(steps):
        token = choose_token(logits, greedy, None, seen).token
        logits = runner.decode([0], [token])[0]
    elapsed = time.perf_counter() - started
    runner.release(0)
    return elapsed


def run_mode(spec: WorkerSpec, result: BenchRow, phases: Phases) -> None:
    from app.engine.runner import make_runner
    from app.model_loader import load_model
    from app.settings import load_settings

    phases.enter("load")
    settings = load_settings(model=spec.model, precision=spec.mode, device=spec.device, cache_dir=spec.cache_dir)
    loaded = load_model(settings)
    report = loaded.report
    result.update(
        {
            "backend": report.backend,
            "bits": report.bits,
            "compute_dtype": report.compute_dtype,
            "kernels": dict(report.kernels),
            "layers_quantized": report.layers_quantized,
            "layers_fallback": report.layers_fallback,
            "load_seconds": loaded.load_seconds,
            "quantize_seconds": report.quantize_seconds,
            "calibration_seconds": None if report.calibration is None else report.calibration.seconds,
            "weight_bytes": report.total_weight_bytes,
        }
    )
    text = benchmark_text(spec)
    if spec.measure_speed:
        # the runner the service's engine uses, with the same cache slots and length
        runner = make_runner(loaded.model, loaded.device, settings.batch_slots, settings.max_total_tokens)
        warmup = first_tokens(loaded.tokenizer, text, 8)
        measure_decode(runner, warmup, 2)  # first calls pay one-off costs (allocations, lazy init)
        phases.enter("prefill")
        ids = first_tokens(loaded.tokenizer, text, spec.prompt_tokens)
        seconds = measure_prefill(runner, ids, spec.prefill_repeats)
        result.update({"prefill_tokens": len(ids), "prefill_tok_s": len(ids) / seconds})
        phases.enter("decode")
        seconds = measure_decode(runner, warmup, spec.decode_tokens)
        result.update({"decode_tokens": spec.decode_tokens, "decode_tok_s": spec.decode_tokens / seconds})
    result.peak_rss_bytes = peak_rss_bytes()
    if spec.max_tokens > 0:
        phases.enter("quality")
        result.update(score_quality(spec, loaded.model, loaded.tokenizer, text))


def score_quality(spec: WorkerSpec, model: Any, tokenizer: Any, text: str) -> dict[str, Any]:
    """Perplexity, top-1 agreement and KL divergence against the reference, by `tools.quality` on its
    windows of the text. The reference job writes its log-probabilities (float32, exact) beside
    `reference_path`; the other jobs read them."""
    ids = quality.tokenize(tokenizer, text, spec.max_tokens)
    reference_path = Path(spec.reference_path) if spec.reference_path else None
    logprobs_path = None if reference_path is None else reference_path.with_name("reference-logprobs.npy")
    logprobs = None
    if spec.is_reference and logprobs_path is not None:
        vocabulary = model.get_output_embeddings().out_features
        logprobs = quality.ReferenceLogProbs(logprobs_path, len(ids) - 1, vocabulary)
    elif logprobs_path is not None and logprobs_path.exists():
        logprobs = quality.ReferenceLogProbs.open(logprobs_path)
    scores = quality.score(
        model,
        ids,
        spec.context,
        spec.stride,
        on_window=lambda done, total: emit("progress", done=done, total=total),
        reference=logprobs,
        write_reference=spec.is_reference,
    )
    if spec.is_reference and reference_path is not None:
        torch.save(scores.top1, reference_path)
    reference = torch.load(reference_path) if reference_path and reference_path.exists() else None
    # None when the reference job failed: no agreement or KL to report
    agreement = None if reference is None else (scores.top1 == reference).float().mean().item()
    return {
        "quality_tokens": scores.count,
        "perplexity": math.exp(scores.nll_sum / scores.count),
        "top1_agreement": agreement,
        "top1_differs": None if agreement is None else 1.0 - agreement,
        "kl_mean": None if scores.kl is None else scores.kl.mean().item(),
        "kl_p99": None if scores.kl is None else torch.quantile(scores.kl.double(), 0.99).item(),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = WorkerSpec.from_json(args[0])
    result = spec.empty_row()
    phases = Phases()
    try:
        run_mode(spec, result, phases)
    except Exception as error:
        traceback.print_exc()
        result.fail(phases.current, f"{type(error).__name__}: {error}".splitlines()[0])
    result.phase_seconds = phases.finish()
    emit("result", data=result.to_dict())
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
