"""Prometheus metrics of one served model, in one or several precision modes.

Every series carries the `model` and `precision` labels, so one Prometheus can
compare precision modes side by side; generation series (latency, tokens,
batching) add `backend`. Label values are bounded: the model and modes are fixed
per process, routes are route templates, `error_type` is a fixed set. A process that
serves several modes has one registry and one `ServiceMetrics` view per mode
(`for_mode`), which labels what it records with its mode; the shadow scorer's series
add `reference`, the mode the answers are scored against.

Memory (resident set, CUDA allocator) is read at scrape time by a collector,
so a scrape always sees the current figure.

Each app gets its own CollectorRegistry so several apps (tests, benchmarks) can
live in one process without clashing.
"""

from __future__ import annotations

import copy
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
# Per-token KL divergence in nats: a faithful mode sits at 1e-4..1e-2, a broken one above 1.
KL_BUCKETS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10)
POSITION_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

BASE_LABELS = ("model", "precision")
GENERATION_LABELS = (*BASE_LABELS, "backend")
INFO_LABELS = (*GENERATION_LABELS, "bits", "group_size", "kernel", "device", "compute_dtype")
SHADOW_LABELS = (*BASE_LABELS, "reference")
SHADOW_OUTCOMES = ("scored", "failed", "dropped")


def declared_backend(precision: str) -> str:
    # "native" is no registered mode: a pre-quantized checkpoint served as stored, on our torch layers.
    return quant.get_mode(precision).backend if precision in quant.list_modes() else "torch"


class ServiceMetrics:
    def __init__(self, model: str, precision: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model": model, "precision": precision}
        # The mode's declared backend until `set_model_info` reports what was loaded.
        self.generation_labels = {**self.labels, "backend": declared_backend(precision)}
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
        self.shadow_kl = Histogram(
            "qs_shadow_kl_divergence",
            "Per generated token of a shadowed request: KL(reference || served mode) of the next-token "
            "distributions, in nats",
            SHADOW_LABELS,
            buckets=KL_BUCKETS,
            registry=r,
        )
        self.shadow_tokens = Counter(
            "qs_shadow_tokens_total", "Generated tokens scored against the reference", SHADOW_LABELS, registry=r
        )
        self.shadow_top1_agreements = Counter(
            "qs_shadow_top1_agreements_total",
            "Scored tokens whose most likely next token is the same in the served mode and the reference",
            SHADOW_LABELS,
            registry=r,
        )
        self.shadow_first_divergence = Histogram(
            "qs_shadow_first_divergence_position",
            "Per shadowed answer where it happens: index of the first generated token that differs from the "
            "reference's greedy choice",
            SHADOW_LABELS,
            buckets=POSITION_BUCKETS,
            registry=r,
        )
        self.shadow_replays = Counter(
            "qs_shadow_replays_total",
            "Shadow replays by outcome: scored, failed (counted and dropped), dropped (the replay queue was full)",
            [*SHADOW_LABELS, "outcome"],
            registry=r,
        )
        self._modes = [self]  # every view of this registry, for the memory collector
        r.register(_MemoryCollector(self))

    def for_mode(self, precision: str) -> ServiceMetrics:
        """A view on the same registry and series that records with `precision` as its label."""
        view = copy.copy(self)
        view.labels = {**self.labels, "precision": precision}
        view.generation_labels = {**view.labels, "backend": declared_backend(precision)}
        view.device = None
        view.engine_failures.labels(**view.labels)
        self._modes.append(view)
        return view

    def start_shadow(self, reference: str) -> None:
        """Create this mode's shadow series at zero, so agreement and rates exist before the first replay."""
        labels = {**self.labels, "reference": reference}
        for metric in (self.shadow_kl, self.shadow_tokens, self.shadow_top1_agreements, self.shadow_first_divergence):
            metric.labels(**labels)
        for outcome in SHADOW_OUTCOMES:
            self.shadow_replays.labels(**labels, outcome=outcome)

    def observe_shadow(
        self, reference: str, kl_per_token: list[float], top1_agreements: int, first_divergence: int | None
    ) -> None:
        """One scored replay of this mode's answer on `reference`."""
        labels = {**self.labels, "reference": reference}
        histogram = self.shadow_kl.labels(**labels)
        for value in kl_per_token:
            histogram.observe(value)
        self.shadow_tokens.labels(**labels).inc(len(kl_per_token))
        self.shadow_top1_agreements.labels(**labels).inc(top1_agreements)
        if first_divergence is not None:
            self.shadow_first_divergence.labels(**labels).observe(first_divergence)
        self.shadow_replays.labels(**labels, outcome="scored").inc()

    def count_shadow(self, reference: str, outcome: str) -> None:
        """A replay that failed or was dropped."""
        self.shadow_replays.labels(**self.labels, reference=reference, outcome=outcome).inc()

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

    def observe_request(
        self, route: str, status: int, error_type: str, seconds: float, precision: str | None = None
    ) -> None:
        """One HTTP request; `precision`: the mode it picked (default: this view's)."""
        labels = self.labels if precision is None else {**self.labels, "precision": precision}
        self.requests.labels(**labels, route=route, status=str(status), error_type=error_type).inc()
        self.request_duration.labels(**labels, route=route).observe(seconds)

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
        # the process is shared: in a multi-mode process each mode's series shows the whole process
        label_sets = [view.labels for view in self._metrics._modes if view is not self._metrics] or [
            self._metrics.labels
        ]
        memory = process_memory()
        if memory.resident is not None:
            yield self._gauges(
                "qs_process_resident_memory_bytes", "Resident memory of the process", label_sets, memory.resident
            )
        if memory.resident_file is not None:
            yield self._gauges(
                "qs_process_resident_memory_file_bytes",
                "Part of the resident memory backed by files (memory-mapped checkpoint, libraries); reclaimable",
                label_sets,
                memory.resident_file,
            )
        yield self._gauges(
            "qs_process_resident_memory_peak_bytes", "Peak resident memory of the process", label_sets, memory.peak
        )
        labels = label_sets[0]
        device = self._metrics.device or next((v.device for v in self._metrics._modes if v.device), None)
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
    def _gauges(name: str, documentation: str, label_sets: list[dict[str, str]], value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=list(label_sets[0]))
        for labels in label_sets:
            family.add_metric(list(labels.values()), value)
        return family

    @staticmethod
    def _gauge(name: str, documentation: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family
