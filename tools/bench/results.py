"""What the benchmark measures for one job: a precision mode of ours, or the peer engine (one row of the report)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ENGINE = "quantserve"  # the engine of every precision-mode row
PEER_ENGINE = "llama.cpp"  # the optional peer rows: another engine on the model's GGUF, in none of our modes


@dataclass
class BenchRow:
    """One row of the comparison: speed, memory and quality of `mode` in quantserve, or of the peer engine."""

    mode: str | None  # the precision mode; None for the peer engine, which runs the GGUF as it is
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None  # "<phase>: <reason>" when failed
    engine: str = ENGINE  # ENGINE | PEER_ENGINE
    gguf_type: str | None = None  # a peer row's file type (F32, Q8_0, Q4_0, Q4_1...); None for our modes

    # what the mode is (from its QuantReport); a peer row's backend is the CPU back end it loaded
    backend: str | None = None
    bits: float | None = None
    compute_dtype: str | None = None
    kernels: dict[str, int] = field(default_factory=dict)
    layers_quantized: int | None = None
    layers_fallback: int | None = None

    # load and memory, measured in the mode's own worker process
    load_seconds: float | None = None  # read the float checkpoint and quantize it, as the service does
    quantize_seconds: float | None = None  # the quantization alone (calibration or its cache included)
    calibration_seconds: float | None = None  # calibrated modes: the calibration run (its original time on a hit)
    weight_bytes: int | None = None
    fp32_weight_bytes: int | None = None  # the same model before quantization
    weight_ratio: float | None = None  # weight_bytes / fp32_weight_bytes
    peak_rss_bytes: int | None = None  # after load, prefill and decode (before the quality pass)

    # speed in the worker, batch 1
    prefill_tokens: int | None = None
    prefill_tok_s: float | None = None
    decode_tokens: int | None = None
    decode_tok_s: float | None = None

    # speed through the real server process: one stream, then concurrent streams
    single_stream_tok_s: float | None = None  # one client: generated tokens per second
    single_stream_ttft_p50_s: float | None = None
    single_stream_tpot_p50_s: float | None = None
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
    top1_differs: float | None = None  # 1 - top1_agreement, as llama.cpp's KL report words it
    kl_mean: float | None = None  # KL(reference ‖ mode) of the next-token distributions, nats: mean over positions
    kl_p99: float | None = None  # and its 99th percentile
    perplexity_increase: float | None = None  # perplexity / reference perplexity - 1

    # wall time of each phase (load, prefill, decode, quality in the worker; serve in the parent;
    # quantize, llama-bench, serve for a peer row)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    # a peer row's details: its file, how it was made, llama-bench's statistics, the server's flags
    peer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.mode is None) != self.is_peer:
            raise ValueError(f"a {self.engine} row needs {'no' if self.is_peer else 'a'} precision mode")
        if self.gguf_type is not None and not self.is_peer:
            raise ValueError(f"a {self.engine} row has no GGUF type")

    @property
    def is_peer(self) -> bool:
        return self.engine != ENGINE

    @property
    def label(self) -> str:
        """The row's name in the report: its precision mode, or the peer engine's name and file type."""
        if not self.is_peer:
            return self.mode
        return f"{self.engine} {self.gguf_type}" if self.gguf_type else self.engine

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
    def from_dict(cls, data: dict[str, Any]) -> BenchRow:
        result = cls(mode=data["mode"], engine=data["engine"], gguf_type=data.get("gguf_type"))
        result.update({k: v for k, v in data.items() if k not in ("mode", "engine", "gguf_type")})
        return result
