"""One benchmark job in its own process, so peak memory and allocator state never mix between modes.

`python -m app.bench.worker SPEC_JSON` loads the model in one mode exactly as the
service does (`app.model_loader.load_model`), measures prefill and single-stream
decode through the engine's model runner, records the process's peak RSS, then
scores quality with `quant.eval`. It talks to the parent on stdout with lines
that start with `@@bench ` (JSON); everything else it prints is only logged.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from app.bench.results import ModeResult

PROTOCOL_PREFIX = "@@bench "


@dataclass(frozen=True)
class WorkerSpec:
    mode: str  # a precision mode, or "llama.cpp" for the peer row
    model: str
    cache_dir: str
    device: str
    text: str | None  # quality text file; None: the quality tool's default text
    prompt_tokens: int  # prefill prompt length
    decode_tokens: int  # greedy decode steps, batch 1
    prefill_repeats: int  # best of N prefill runs (the machine is noisy)
    max_tokens: int  # quality token budget; 0 skips quality
    reference_path: str  # fp32 predictions for the agreement score
    is_reference: bool  # this job writes `reference_path` instead of reading it
    measure_speed: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def emit(event: str, **data: Any) -> None:
    print(PROTOCOL_PREFIX + json.dumps({"event": event, **data}), flush=True)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def benchmark_text(spec: WorkerSpec) -> str:
    from quant import eval as quality

    return quality.load_text(spec.text)


def prompt_ids(tokenizer: Any, text: str, length: int) -> list[int]:
    """The first `length` tokens of `text` (repeated if the text is shorter)."""
    ids = tokenizer(text[: length * 16])["input_ids"]  # ~4 chars a token; 16 leaves a wide margin
    if not ids:
        raise ValueError("the benchmark text has no tokens")
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


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
        token, _ = choose_token(logits, greedy, None, seen)
        logits = runner.decode([0], [token])[0]
    elapsed = time.perf_counter() - started
    runner.release(0)
    return elapsed


def make_runner(loaded: Any) -> Any:
    """The model runner the service's engine uses for this model."""
    from app.engine.runner import HFRunner

    return HFRunner(loaded.model, loaded.device)


def run_mode(spec: WorkerSpec, result: ModeResult) -> None:
    from app.model_loader import load_model
    from app.settings import load_settings

    emit("phase", name="load")
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
            "weight_bytes": report.total_weight_bytes,
        }
    )
    text = benchmark_text(spec)
    if spec.measure_speed:
        runner = make_runner(loaded)
        warmup = prompt_ids(loaded.tokenizer, text, 8)
        measure_decode(runner, warmup, 2)  # first calls pay one-off costs (allocations, lazy init)
        emit("phase", name="prefill")
        ids = prompt_ids(loaded.tokenizer, text, spec.prompt_tokens)
        seconds = measure_prefill(runner, ids, spec.prefill_repeats)
        result.update({"prefill_tokens": len(ids), "prefill_tok_s": len(ids) / seconds})
        emit("phase", name="decode")
        seconds = measure_decode(runner, warmup, spec.decode_tokens)
        result.update({"decode_tokens": spec.decode_tokens, "decode_tok_s": spec.decode_tokens / seconds})
    result.peak_rss_bytes = peak_rss_bytes()
    if spec.max_tokens > 0:
        emit("phase", name="quality")
        result.update(score_quality(spec, loaded.model, loaded.tokenizer, text))


def score_quality(spec: WorkerSpec, model: Any, tokenizer: Any, text: str) -> dict[str, Any]:
    raise NotImplementedError  # filled in once quant.eval lands


def run_llama_cpp(spec: WorkerSpec, result: ModeResult) -> None:
    from app.bench.llamacpp import measure_llama_cpp

    emit("phase", name="load")
    text = benchmark_text(spec)
    result.update(measure_llama_cpp(spec.model, text, spec.prompt_tokens, spec.decode_tokens, spec.prefill_repeats))
    result.peak_rss_bytes = peak_rss_bytes()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = WorkerSpec.from_json(args[0])
    result = ModeResult(spec.mode, kind="llama.cpp" if spec.mode == "llama.cpp" else "quantserve")
    try:
        if result.kind == "llama.cpp":
            run_llama_cpp(spec, result)
        else:
            run_mode(spec, result)
    except Exception as error:
        traceback.print_exc()
        result.fail("worker", f"{type(error).__name__}: {error}".splitlines()[0])
    emit("result", data=result.to_dict())
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
