"""The load generator: its accounting against a real server on the tiny model, its figures on fixed samples."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.settings import load_settings
from tests.support.live_server import serve_app
from tools import loadgen
from tools.loadgen import RequestSample, format_table, main, percentile, run_load


def test_percentile_interpolates():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    assert math.isnan(percentile([], 50))


def test_load_counts_every_token_of_every_client(tiny_model_dir: Path, tmp_path: Path, capsys):
    settings = load_settings(model=str(tiny_model_dir), device="cpu", cache_dir=tmp_path, max_batch_size=4)
    with serve_app(settings) as (url, _app):
        started = time.perf_counter()
        result = asyncio.run(run_load(url, 3, max_new_tokens=6, requests_per_client=2))
        outside = time.perf_counter() - started  # timed here: the load's own clock runs inside it
        assert main(["--url", url, "--clients", "1,2", "--max-new-tokens", "3", "--requests-per-client", "1"]) == 0
        # every chunk carries the log-probs asked for (a chunk without them fails its request)
        scored = asyncio.run(run_load(url, 2, max_new_tokens=4, requests_per_client=1, logprobs=2))
    assert (result.clients, result.requests, result.failed) == (3, 6, 0)
    assert (scored.requests, scored.failed, scored.generated_tokens) == (2, 0, 8)
    assert result.generated_tokens == 3 * 2 * 6  # ignore_eos: every request runs to max_new_tokens
    assert 0 < result.ttft_p50 <= result.ttft_p95
    assert 0 < result.tpot_p50 <= result.tpot_p95
    assert 0 < result.seconds <= outside
    assert result.tokens_per_second >= 36 / outside
    assert "| 3 | 6 | 0 | 36 |" in format_table([result])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2  # one row per number of clients


def test_load_figures_from_known_samples(monkeypatch):
    # Fixed samples and a clock that reads 100 s at the start and 104 s at the end: every figure is known.
    samples = iter(
        [
            RequestSample(ttft=0.1, tpot=0.01, tokens=6),
            RequestSample(ttft=0.3, tpot=0.03, tokens=6),
            RequestSample(ttft=0.2, tpot=0.02, tokens=6),
            RequestSample(ttft=0.5, tpot=None, tokens=1),
        ]
    )

    async def fake_stream(
        client, prompt: str, max_new_tokens: int, headers: dict[str, str], logprobs: int | None = None
    ) -> RequestSample:
        return next(samples)

    readings = iter([100.0, 104.0])
    monkeypatch.setattr(loadgen, "stream_completion", fake_stream)
    monkeypatch.setattr(loadgen, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    result = asyncio.run(run_load("http://127.0.0.1:9", 2, max_new_tokens=6, requests_per_client=2))
    assert (result.requests, result.failed, result.generated_tokens) == (4, 0, 19)
    assert result.seconds == 4.0
    assert result.tokens_per_second == pytest.approx(19 / 4)
    assert result.ttft_p50 == pytest.approx(0.25)  # between 0.2 and 0.3
    assert result.ttft_p95 == pytest.approx(0.47)  # 0.3 + 0.85 * (0.5 - 0.3)
    assert result.tpot_p50 == pytest.approx(0.02)  # the single-token request has no TPOT
    assert result.tpot_p95 == pytest.approx(0.029)  # 0.02 + 0.9 * 0.01
