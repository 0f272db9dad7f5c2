"""The metrics contract: names, labels on every series, values that follow the observations."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import quant
from app.metrics import ServiceMetrics, process_memory


def samples(source: ServiceMetrics | str) -> list:
    """Parsed samples of a registry or of a /metrics body."""
    text = source if isinstance(source, str) else generate_latest(source.registry).decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(source: ServiceMetrics | str, name: str, **labels: str) -> float:
    matches = [s.value for s in samples(source) if s.name == name and labels.items() <= s.labels.items()]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def int8_report() -> quant.QuantReport:
    return quant.QuantReport(
        mode="int8",
        backend="torch",
        bits=8,
        group_size=None,
        compute_dtype="float32",
        total_weight_bytes=1234,
        kernels={"avx2": 3, "reference": 1},
    )


@pytest.fixture
def metrics() -> ServiceMetrics:
    m = ServiceMetrics(model="tiny", precision="int8")
    m.set_model_info(int8_report(), torch.device("cpu"))
    return m


def test_every_series_carries_model_and_precision(metrics: ServiceMetrics):
    metrics.observe_request("/generate", 200, "none", 0.05)
    metrics.observe_generation(5, 3, 0.001, 0.01, 0.03)
    metrics.observe_batch_size(2)
    found = samples(metrics)
    assert {s.name.removesuffix("_bucket") for s in found} >= {
        "qs_requests_total",
        "qs_request_duration_seconds",
        "qs_e2e_request_latency_seconds",
        "qs_queue_time_seconds",
        "qs_time_to_first_token_seconds",
        "qs_time_per_output_token_seconds",
        "qs_prompt_tokens_total",
        "qs_generated_tokens_total",
        "qs_request_prompt_tokens",
        "qs_request_generated_tokens",
        "qs_requests_running",
        "qs_requests_waiting",
        "qs_batch_size",
        "qs_model_weight_bytes",
        "qs_model_info",
        "qs_process_resident_memory_bytes",
        "qs_process_resident_memory_peak_bytes",
        "qs_process_resident_memory_file_bytes",
    }
    for s in found:
        assert s.labels["model"] == "tiny" and s.labels["precision"] == "int8", s


def test_generation_series_carry_the_backend(metrics: ServiceMetrics):
    metrics.observe_generation(5, 3, 0.001, 0.01, 0.03)
    for s in samples(metrics):
        if s.name.startswith(("qs_time_", "qs_queue_", "qs_e2e_", "qs_generated_", "qs_prompt_", "qs_batch_")):
            assert s.labels["backend"] == "torch", s


def test_info_gauge_describes_the_loaded_mode(metrics: ServiceMetrics):
    assert (
        value(
            metrics,
            "qs_model_info",
            backend="torch",
            bits="8",
            group_size="none",
            kernel="avx2+reference",
            device="cpu",
            compute_dtype="float32",
        )
        == 1
    )
    assert value(metrics, "qs_model_weight_bytes") == 1234


def test_generation_observations(metrics: ServiceMetrics):
    metrics.observe_generation(
        prompt_tokens=7, generated_tokens=5, queue_seconds=0.002, first_token_seconds=0.02, total_seconds=0.1
    )
    metrics.observe_generation(
        prompt_tokens=3, generated_tokens=1, queue_seconds=0.0, first_token_seconds=0.01, total_seconds=0.01
    )
    assert value(metrics, "qs_prompt_tokens_total") == 10
    assert value(metrics, "qs_generated_tokens_total") == 6
    assert value(metrics, "qs_request_generated_tokens_count") == 2
    assert value(metrics, "qs_request_generated_tokens_sum") == 6
    assert value(metrics, "qs_time_to_first_token_seconds_count") == 2
    # One request had a single token: it has no inter-token time.
    assert value(metrics, "qs_time_per_output_token_seconds_count") == 1
    assert value(metrics, "qs_time_per_output_token_seconds_sum") == pytest.approx((0.1 - 0.02) / 4)
    assert value(metrics, "qs_e2e_request_latency_seconds_sum") == pytest.approx(0.11)
    # 1 ms resolves: the 2 ms queue wait lands above the 1 ms bucket.
    assert value(metrics, "qs_queue_time_seconds_bucket", le="0.001") == 1


def test_series_exist_at_zero_before_the_first_request(metrics: ServiceMetrics):
    assert value(metrics, "qs_generated_tokens_total") == 0
    assert value(metrics, "qs_time_to_first_token_seconds_count") == 0
    assert value(metrics, "qs_requests_running") == 0


def test_scheduler_state_and_batch_size(metrics: ServiceMetrics):
    metrics.set_scheduler_state(running=3, waiting=2)
    for size in (1, 3, 3):
        metrics.observe_batch_size(size)
    assert value(metrics, "qs_requests_running") == 3
    assert value(metrics, "qs_requests_waiting") == 2
    assert value(metrics, "qs_batch_size_sum") == 7
    assert value(metrics, "qs_batch_size_bucket", le="2.0") == 1


def test_memory_is_read_at_scrape_time(metrics: ServiceMetrics):
    size = 200 * 2**20
    before = value(metrics, "qs_process_resident_memory_bytes")
    block = bytearray(b"\x01") * size  # written in full: every page becomes resident
    try:
        rss = value(metrics, "qs_process_resident_memory_bytes")
        peak = value(metrics, "qs_process_resident_memory_peak_bytes")
        # a value cached before the allocation (or read once at start-up) would not have grown
        assert rss - before >= 0.7 * size, (before, rss)
        assert peak >= rss
        assert 0 < value(metrics, "qs_process_resident_memory_file_bytes") < rss
        assert process_memory().resident is not None  # Linux reads /proc
    finally:
        del block


def test_no_cuda_series_on_cpu(metrics: ServiceMetrics):
    assert not [s for s in samples(metrics) if s.name.startswith("qs_cuda_")]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_series():
    m = ServiceMetrics(model="tiny", precision="fp32")
    m.set_model_info(int8_report(), torch.device("cuda:0"))
    held = torch.empty(2**20, device="cuda:0")
    assert value(m, "qs_cuda_memory_allocated_bytes", device="cuda:0") >= held.numel() * 4
    assert value(m, "qs_cuda_memory_reserved_bytes") >= value(m, "qs_cuda_memory_allocated_bytes")


def test_label_values_stay_bounded(client):
    """Prompts and unknown paths never become label values."""
    for prompt in ("zebra one", "zebra two"):
        client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 2}})
    client.get("/no/such/path/123")
    client.get("/health")
    text = client.get("/metrics").text
    routes = {s.labels["route"] for s in samples(text) if "route" in s.labels}
    assert routes == {"/generate", "/health"}
    assert "zebra" not in text
    assert value(text, "qs_model_info", precision="fp32", device="cpu") == 1
