"""What the benchmark measures for one precision mode (one row of the report)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

PEER_MODE = "llama.cpp"  # the optional peer row's name and kind


@dataclass
class ModeResult:
    mode: str
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None  # "<phase>: <reason>" when failed
    kind: str = "quantserve"  # "quantserve" | PEER_MODE

    # what the mode is (from its QuantReport)
    backend: str | None = None
    bits: float | None = None
    compute_dtype: str | None = None
    kernels: dict[str, int] = field(default_factory=dict)
    layers_quantized: int | None = None
    layers_fallback: int | None = None

    # load and memory, measured in the mode's own worker process
    load_seconds: float | None = None  # read the float checkpoint and quantize it, as the service does
    weight_bytes: int | None = None
    fp32_weight_bytes: int | None = None  # the same model before quantization
    weight_ratio: float | None = None  # weight_bytes / fp32_weight_bytes
    peak_rss_bytes: int | None = None  # after load, prefill and decode (before the quality pass)

    # speed in the worker, batch 1
    prefill_tokens: int | None = None
    prefill_tok_s: float | None = None
    decode_tokens: int | None = None
    decode_tok_s: float | None = None

    # speed through the real server process, concurrent streams
    serve_concurrency: int | None = None
    serve_requests: int | None = None
    serve_generated_tokens: int | None = None
    serve_tok_s: float | None = None  # aggregate generated tokens per second
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    tpot_p50_s: float | None = None  # time per output token after the first
    tpot_p95_s: float | None = None

    # quality on the text, against the reference mode
    quality_tokens: int | None = None
    perplexity: float | None = None
    top1_agreement: float | None = None
    perplexity_increase: float | None = None  # perplexity / reference perplexity - 1

    # wall time of each phase (load, prefill, decode, quality in the worker; serve in the parent)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def fail(self, phase: str, reason: str) -> None:
        """Record the first failure; later phases keep what they measured."""
        self.status = "failed"
        if self.error is None:
            self.error = f"{phase}: {reason}"

    def update(self, values: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        unknown = set(values) - names
        if unknown:
            raise KeyError(f"unknown result fields: {sorted(unknown)}")
        for key, value in values.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModeResult:
        result = cls(mode=data["mode"])
        result.update({k: v for k, v in data.items() if k != "mode"})
        return result


def result_for(mode: str) -> ModeResult:
    """An empty row of the right kind for a job named `mode`."""
    return ModeResult(mode, kind=PEER_MODE if mode == PEER_MODE else "quantserve")
