"""Prometheus metrics; every series carries the `model` and `precision` labels.

Each app gets its own CollectorRegistry so several apps (tests, benchmarks) can
live in one process without clashing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From 1 ms: a small model on a fast path answers short requests in milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)

BASE_LABELS = ("model", "precision")


class ServiceMetrics:
    def __init__(self, model: str, precision: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model": model, "precision": precision}
        r = self.registry
        self.requests = Counter(
            "qs_requests_total",
            "HTTP requests by route, status and error type",
            [*BASE_LABELS, "route", "status", "error_type"],
            registry=r,
        )
        self.request_duration = Histogram(
            "qs_request_duration_seconds",
            "End-to-end HTTP request latency",
            [*BASE_LABELS, "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "qs_queue_time_seconds",
            "Time a request waits before its prefill",
            BASE_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "qs_time_to_first_token_seconds",
            "Arrival to first generated token",
            BASE_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "qs_time_per_output_token_seconds",
            "Mean time between generated tokens, per request",
            BASE_LABELS,
            buckets=PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("qs_prompt_tokens_total", "Prompt tokens processed", BASE_LABELS, registry=r)
        self.generated_tokens = Counter("qs_generated_tokens_total", "Tokens generated", BASE_LABELS, registry=r)
        self.weight_bytes = Gauge(
            "qs_model_weight_bytes", "Bytes of the loaded model's weights", BASE_LABELS, registry=r
        )
        self.in_flight = Gauge("qs_requests_running", "Generation requests in flight", BASE_LABELS, registry=r)
        self.waiting = Gauge("qs_requests_waiting", "Requests queued for a batch slot", BASE_LABELS, registry=r)
        self.batch_size = Histogram(
            "qs_batch_size", "Sequences in each decode step", BASE_LABELS, buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )

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
        self.prompt_tokens.labels(**self.labels).inc(prompt_tokens)
        self.generated_tokens.labels(**self.labels).inc(generated_tokens)
        self.queue_time.labels(**self.labels).observe(queue_seconds)
        if first_token_seconds is not None:
            self.time_to_first_token.labels(**self.labels).observe(first_token_seconds)
            if generated_tokens > 1:
                per_token = (total_seconds - first_token_seconds) / (generated_tokens - 1)
                self.time_per_output_token.labels(**self.labels).observe(per_token)

    def set_scheduler_state(self, running: int, waiting: int) -> None:
        """Called by the engine whenever its batch or queue changes."""
        self.in_flight.labels(**self.labels).set(running)
        self.waiting.labels(**self.labels).set(waiting)

    def observe_batch_size(self, sequences: int) -> None:
        """Called by the engine once per decode step."""
        self.batch_size.labels(**self.labels).observe(sequences)
