"""Prometheus metrics of one served model.

Every series carries the `model` and `precision` labels, so one Prometheus can
compare precision modes side by side; generation series (latency, tokens,
batching) add `backend`. Label values are bounded: the model and mode are fixed
per process, routes are route templates, `error_type` is a fixed set.

Memory (resident set, CUDA allocator) is read at scrape time by a collector,
so a scrape always sees the current figure.

Each app gets its own CollectorRegistry so several apps (tests, benchmarks) can
live in one process without clashing.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import quant

if TYPE_CHECKING:
    import torch

# From 1 ms: a small model on a fast path answers short requests in milliseconds;
# finer from 100 ms to 3 s, where time to first token on a CPU lands.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120)
PER_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
TOKEN_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

BASE_LABELS = ("model", "precision")
GENERATION_LABELS = (*BASE_LABELS, "backend")
INFO_LABELS = (*GENERATION_LABELS, "bits", "group_size", "kernel", "device", "compute_dtype")


class ServiceMetrics:
    def __init__(self, model: str, precision: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model": model, "precision": precision}
        # The mode's declared backend until `set_model_info` reports what was loaded ("native" is no registered
        # mode: a pre-quantized checkpoint served as stored, on our torch layers).
        backend = quant.get_mode(precision).backend if precision in quant.list_modes() else "torch"
        self.generation_labels = {**self.labels, "backend": backend}
        self.device: torch.device | None = None
        r = self.registry

        self.requests = Counter(
            "qs_requests_total",
            "HTTP requests by route, status and error type",
            [*BASE_LABELS, "route", "status", "error_type"],
            registry=r,
        )
        self.request_duration = Histogram(
            "qs_request_duration_seconds",
            "HTTP request latency, from the request to the response headers",
            [*BASE_LABELS, "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "qs_e2e_request_latency_seconds",
            "Generation latency from arrival to the last token (streamed or not)",
            GENERATION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "qs_queue_time_seconds",
            "Time a request waits before its prefill",
            GENERATION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "qs_time_to_first_token_seconds",
            "Arrival to first generated token",
            GENERATION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "qs_time_per_output_token_seconds",
            "Mean time between generated tokens, per request",
            GENERATION_LABELS,
            buckets=PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("qs_prompt_tokens_total", "Prompt tokens processed", GENERATION_LABELS, registry=r)
        self.generated_tokens = Counter("qs_generated_tokens_total", "Tokens generated", GENERATION_LABELS, registry=r)
        self.request_prompt_tokens = Histogram(
            "qs_request_prompt_tokens",
            "Prompt tokens per request",
            GENERATION_LABELS,
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.request_generated_tokens = Histogram(
            "qs_request_generated_tokens",
            "Generated tokens per request",
            GENERATION_LABELS,
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("qs_requests_running", "Generation requests running", BASE_LABELS, registry=r)
        self.waiting = Gauge("qs_requests_waiting", "Requests queued for a batch slot", BASE_LABELS, registry=r)
        self.batch_size = Histogram(
            "qs_batch_size",
            "Sequences in each decode step",
            GENERATION_LABELS,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.engine_failures = Counter(
            "qs_engine_failures_total",
            "Engine faults: a model step raised or the worker died, failing every request in flight",
            BASE_LABELS,
            registry=r,
        )
        self.engine_failures.labels(**self.labels)  # exported at 0 from the start, so alerts see it
        self.weight_bytes = Gauge(
            "qs_model_weight_bytes", "Bytes of the loaded model's weights", BASE_LABELS, registry=r
        )
        self.model_info = Gauge(
            "qs_model_info",
            "Always 1; the labels describe the loaded model and precision mode",
            INFO_LABELS,
            registry=r,
        )
        r.register(_MemoryCollector(self))

    def set_model_info(self, report: quant.QuantReport, device: torch.device) -> None:
        """Called once the model is loaded and quantized, before the engine serves."""
        self.device = device
        self.generation_labels = {**self.labels, "backend": report.backend}
        self.weight_bytes.labels(**self.labels).set(report.total_weight_bytes)
        self.model_info.labels(
            **self.generation_labels,
            bits=f"{report.bits:g}",
            group_size=str(report.group_size) if report.group_size else "none",
            kernel="+".join(sorted(report.kernels)) or "none",
            device=str(device),
            compute_dtype=report.compute_dtype,
        ).set(1)
        # Create the series at zero so rates and quantiles exist before the first request.
        for metric in (
            self.prompt_tokens,
            self.generated_tokens,
            self.e2e_latency,
            self.queue_time,
            self.time_to_first_token,
            self.time_per_output_token,
            self.request_prompt_tokens,
            self.request_generated_tokens,
            self.batch_size,
        ):
            metric.labels(**self.generation_labels)
        self.set_scheduler_state(0, 0)

    def observe_request(self, route: str, status: int, error_type: str, seconds: float) -> None:
        self.requests.labels(**self.labels, route=route, status=str(status), error_type=error_type).inc()
        self.request_duration.labels(**self.labels, route=route).observe(seconds)

    def observe_generation(
        self,
        prompt_tokens: int,
        generated_tokens: int,
        queue_seconds: float,
        first_token_seconds: float | None,
        total_seconds: float,
    ) -> None:
        """One finished generation; times are from its arrival."""
        labels = self.generation_labels
        self.prompt_tokens.labels(**labels).inc(prompt_tokens)
        self.generated_tokens.labels(**labels).inc(generated_tokens)
        self.request_prompt_tokens.labels(**labels).observe(prompt_tokens)
        self.request_generated_tokens.labels(**labels).observe(generated_tokens)
        self.queue_time.labels(**labels).observe(queue_seconds)
        self.e2e_latency.labels(**labels).observe(total_seconds)
        if first_token_seconds is not None:
            self.time_to_first_token.labels(**labels).observe(first_token_seconds)
            if generated_tokens > 1:
                per_token = (total_seconds - first_token_seconds) / (generated_tokens - 1)
                self.time_per_output_token.labels(**labels).observe(per_token)

    def set_scheduler_state(self, running: int, waiting: int) -> None:
        """Called by the engine whenever its batch or queue changes."""
        self.in_flight.labels(**self.labels).set(running)
        self.waiting.labels(**self.labels).set(waiting)

    def observe_batch_size(self, sequences: int) -> None:
        """Called by the engine once per decode step."""
        self.batch_size.labels(**self.generation_labels).observe(sequences)


@dataclass(frozen=True)
class ProcessMemory:
    resident: int | None  # now
    resident_file: int | None  # the part backed by files: mapped checkpoints and libraries, reclaimable
    peak: int


def process_memory() -> ProcessMemory:
    """Resident memory of this process.

    The current figures come from /proc (Linux, as in the container); elsewhere they
    are None and only the peak, from getrusage, is known.
    """
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)

        def kib(name: str) -> int:
            return int(fields[name].split()[0]) * 1024

        return ProcessMemory(kib("VmRSS"), kib("RssFile"), kib("VmHWM"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ProcessMemory(None, None, peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


class _MemoryCollector(Collector):
    """Process and CUDA memory, read when Prometheus scrapes."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = self._metrics.labels
        memory = process_memory()
        if memory.resident is not None:
            yield self._gauge(
                "qs_process_resident_memory_bytes", "Resident memory of the process", labels, memory.resident
            )
        if memory.resident_file is not None:
            yield self._gauge(
                "qs_process_resident_memory_file_bytes",
                "Part of the resident memory backed by files (memory-mapped checkpoint, libraries); reclaimable",
                labels,
                memory.resident_file,
            )
        yield self._gauge(
            "qs_process_resident_memory_peak_bytes", "Peak resident memory of the process", labels, memory.peak
        )
        device = self._metrics.device
        if device is None or device.type != "cuda":
            return
        import torch  # only reached on a CUDA device, where torch is loaded already

        cuda_labels = {**labels, "device": str(device)}
        yield self._gauge(
            "qs_cuda_memory_allocated_bytes",
            "CUDA memory held by tensors",
            cuda_labels,
            torch.cuda.memory_allocated(device),
        )
        yield self._gauge(
            "qs_cuda_memory_peak_allocated_bytes",
            "Peak CUDA memory held by tensors",
            cuda_labels,
            torch.cuda.max_memory_allocated(device),
        )
        yield self._gauge(
            "qs_cuda_memory_reserved_bytes",
            "CUDA memory reserved by the caching allocator",
            cuda_labels,
            torch.cuda.memory_reserved(device),
        )

    @staticmethod
    def _gauge(name: str, documentation: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family
