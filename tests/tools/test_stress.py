"""The stress tool (`tools.stress`): its checks, a short run against the tiny model, and the issue's full
run (64 clients for 60 s against the default model in int8 with QS_MAX_CONCURRENT_REQUESTS=16; slow)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tests.support.live_server import serve_process
from tools.stress import StressReport, run_stress


def healthy_report() -> StressReport:
    return StressReport(
        clients=2,
        seconds=1,
        statuses=Counter({200: 5, 413: 1, 422: 2, 429: 3}),
        health_latencies=[0.01] * 100,
        rss_warm=1000.0,
        rss_end=1010.0,
        final_gauges={"qs_requests_running": 0.0, "qs_requests_waiting": 0.0},
    )


def test_the_checks_catch_each_kind_of_failure():
    assert healthy_report().problems() == []
    broken = {
        "5xx": lambda r: r.statuses.update({500: 1}),
        "other refusal": lambda r: r.statuses.update({400: 1}),
        "stream error": lambda r: r.stream_errors.append('{"error": "x", "error_type": "generation"}'),
        "health p99": lambda r: r.health_latencies.extend([0.5] * 5),
        "memory": lambda r: setattr(r, "rss_end", 1100.0),
        "left running": lambda r: r.final_gauges.update(qs_requests_running=1.0),
        "transport": lambda r: r.transport_errors.update({"generate: ReadError": 1}),
    }
    for name, breaks in broken.items():
        report = healthy_report()
        breaks(report)
        assert report.problems(), name
    slow = healthy_report()
    slow.health_latencies.extend([0.5] * 5)
    assert slow.problems(timing=False) == []


def test_only_a_loopback_server_is_driven():
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_stress("http://example.com:8000", clients=1, seconds=1))


def test_short_run_against_the_tiny_model(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path):
    """Every kind of client, for a few seconds: the correctness checks (timing is the slow run's)."""
    env = {
        "QS_MODEL": str(tiny_model_dir),
        "QS_DEVICE": "cpu",
        "QS_CACHE_DIR": str(cache_dir),
        "QS_MAX_INPUT_TOKENS": "64",
        "QS_MAX_TOTAL_TOKENS": "256",
        "QS_MAX_CONCURRENT_REQUESTS": "4",
    }
    with serve_process(env, tmp_path / "server.log") as (url, _process):
        report = asyncio.run(run_stress(url, clients=8, seconds=8, warm=2, seed=3))
    print(report.summary())
    assert report.problems(timing=False) == []
    assert report.statuses[200] and report.statuses[413] and report.statuses[422]
    assert set(report.kinds) >= {"huge", "long_prompt", "invalid", "cancel_stream", "slow_reader", "stream"}


@pytest.mark.slow
@pytest.mark.real_model
def test_sixty_seconds_of_sixty_four_clients_on_the_default_model(cache_dir: Path, tmp_path: Path):
    env = {"QS_PRECISION": "int8", "QS_CACHE_DIR": str(cache_dir), "QS_MAX_CONCURRENT_REQUESTS": "16"}
    with serve_process(env, tmp_path / "server.log") as (url, _process):
        report = asyncio.run(run_stress(url, clients=64, seconds=60))
    print(report.summary())
    assert report.problems() == []
