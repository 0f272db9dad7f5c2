"""tools.shadow_bench on the tiny model: two live servers, alternated rounds, the shadowed one really replays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import shadow_bench


@pytest.mark.slow  # two server processes started and loaded: minutes on a shared 2-core machine
def test_one_run_measures_both_servers(tiny_model_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "figures.json"
    argv = [
        "--mode", "int8", "--reference", "fp32", "--sample", "1.0", "--clients", "2",
        "--max-new-tokens", "4", "--requests-per-client", "2", "--rounds", "2",
        "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path), "--logs", str(tmp_path / "logs"),
        "--json", str(out),
    ]  # fmt: skip
    assert shadow_bench.main(argv) == 0
    figures = json.loads(out.read_text())
    assert [len(figures["tokens_per_second"][k]) for k in ("plain", "shadowed")] == [2, 2]
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in figures["tpot_p95_seconds"].values())
    assert figures["ratio"] == figures["median_shadowed"] / figures["median_plain"] > 0
    # every request of the shadowed server (warm-up and 2 rounds) was replayed on fp32, and took CPU turns
    assert figures["shadow"]["scored"] == 2 + 2 * 2 * 2
    assert figures["shadow"]["pending"] == 0  # each round's leftovers were drained before the next round
    assert len(figures["drain_seconds"]) == 2 and len(figures["replays_scored_in_rounds"]) == 2
    assert sum(figures["replays_scored_in_rounds"]) <= 2 * 2 * 2
    assert figures["cpu_seconds_by_party"]["shadow"] > 0 and 0 < figures["turn_ratio"] <= 1
    printed = capsys.readouterr().out
    assert "medians" in printed and "time per output token" in printed
