"""The load generator, against a real server on the tiny model (its figures are not checked, only its accounting)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from app.loadgen import format_table, main, percentile, run_load
from app.settings import load_settings
from tests.app.live_server import serve_app


def test_percentile_interpolates():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    assert math.isnan(percentile([], 50))


def test_load_counts_every_token_of_every_client(tiny_model_dir: Path, tmp_path: Path, capsys):
    settings = load_settings(model=str(tiny_model_dir), device="cpu", cache_dir=tmp_path, max_batch_size=4)
    with serve_app(settings) as (url, _app):
        result = asyncio.run(run_load(url, 3, max_new_tokens=6, requests_per_client=2))
        assert main(["--url", url, "--clients", "1,2", "--max-new-tokens", "3", "--requests-per-client", "1"]) == 0
    assert (result.clients, result.requests, result.failed) == (3, 6, 0)
    assert result.generated_tokens == 3 * 2 * 6  # ignore_eos: every request runs to max_new_tokens
    assert 0 < result.ttft_p50 <= result.ttft_p95
    assert 0 < result.tpot_p50 <= result.tpot_p95
    assert result.tokens_per_second == pytest.approx(result.generated_tokens / result.seconds)
    assert "| 3 | 6 | 0 | 36 |" in format_table([result])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2  # one row per number of clients
