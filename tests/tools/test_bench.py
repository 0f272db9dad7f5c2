"""The mode comparison command: a real run on the tiny random Llama, and its failure paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quant import REFERENCE_MODE
from tests.support import tiny_shapes as tiny
from tools.bench.report import CHARTS, pareto_front, render_markdown, results_document
from tools.bench.results import ENGINE, PEER_ENGINE, BenchRow
from tools.bench.run import BenchOptions, BenchRun, finish_figures, run_worker
from tools.bench.worker import WorkerSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POSITIVE_FIELDS = (
    "load_seconds",
    "weight_bytes",
    "peak_rss_bytes",
    "prefill_tok_s",
    "decode_tok_s",
    "serve_tok_s",
    "serve_generated_tokens",
    "ttft_p50_s",
    "ttft_p95_s",
    "tpot_p50_s",
    "tpot_p95_s",
    "perplexity",
)


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One real run of the command (fp32 and int8, every phase), shared by the checks below."""
    out = tmp_path_factory.mktemp("bench") / "report"
    args = [
        "--model",
        str(tiny_model_dir),
        "--modes",
        "fp32,int8",
        "--max-tokens",
        "300",
        "--prompt-tokens",
        "64",
        "--decode-tokens",
        "8",
        "--concurrency",
        "3",
        "--stream-tokens",
        "6",
        "--device",
        "cpu",
        "--no-peer",
        "--out",
        str(out),
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "tools.bench", *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return out, args


def test_results_json_has_every_measured_field(bench_run):
    out, _ = bench_run
    document = json.loads((out / "results.json").read_text())
    rows = {row["mode"]: row for row in document["rows"]}
    assert list(rows) == ["fp32", "int8"]
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        for field in POSITIVE_FIELDS:
            assert row[field] is not None and row[field] > 0, (row["mode"], field, row[field])
        assert row["prefill_tokens"] == 64
        assert row["decode_tokens"] == 8
        assert row["serve_concurrency"] == 3
        assert row["serve_requests"] == 3
        assert 0 < row["serve_generated_tokens"] <= 3 * 6
        assert row["ttft_p50_s"] <= row["ttft_p95_s"]
        assert row["tpot_p50_s"] <= row["tpot_p95_s"]
        assert row["quality_tokens"] > 0
        assert 0 <= row["top1_agreement"] <= 1
    fp32, int8 = rows["fp32"], rows["int8"]
    assert document["reference"]["mode"] == "fp32" == REFERENCE_MODE
    assert document["reference_mode"] == REFERENCE_MODE
    # bytes against the hand count from the tiny model's shapes (the ratio arithmetic itself is
    # checked on fixed figures in test_ratios_use_the_reference_and_failures_are_reported)
    assert fp32["weight_bytes"] == int8["fp32_weight_bytes"] == tiny.fp32_model_bytes()
    assert int8["weight_bytes"] == tiny.int8_model_bytes()
    assert fp32["weight_ratio"] == 1.0
    assert int8["weight_ratio"] == pytest.approx(tiny.int8_model_bytes() / tiny.fp32_model_bytes())
    assert fp32["top1_agreement"] == 1.0
    assert fp32["perplexity_increase"] == 0.0
    assert isinstance(int8["perplexity_increase"], float)
    assert int8["layers_quantized"] > 0 and fp32["layers_quantized"] == 0
    assert document["machine"]["torch"]
    assert document["machine"]["cpu_model"]


def test_report_shows_table_machine_and_command(bench_run):
    out, args = bench_run
    document = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert document["command"].startswith("python -m tools.bench ")
    assert document["command"].endswith(" ".join(args[-2:]))
    assert document["command"] in report
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| mode | weights MiB"))
    table = [line for line in lines[start:] if line.strip()][:4]
    assert table[1].startswith("|---")
    table = [table[0], *table[2:]]  # header, fp32, int8
    for mode, row in zip(("fp32", "int8"), table[1:], strict=True):
        assert row.startswith(f"| {mode} |")
        assert "–" not in row  # every column measured
    int8 = next(r for r in document["rows"] if r["mode"] == "int8")
    assert f"{int8['weight_ratio']:.3f}" in table[2]
    assert f"torch {document['machine']['torch']}" in report
    assert document["machine"]["cpu_model"] in report
    phase_table = report.split("## Time per phase (s)")[1]
    for row in document["rows"]:
        assert set(row["phase_seconds"]) == {"load", "prefill", "decode", "quality", "serve"}
        assert f"| {row['mode']} | " in phase_table


def test_charts_are_png_files(bench_run):
    out, _ = bench_run
    for name in CHARTS.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5_000, name  # a drawn chart, not an empty canvas


def test_a_failing_job_becomes_a_failed_row(tmp_path: Path):
    spec = WorkerSpec(
        mode="int8",
        model=str(tmp_path / "missing-model"),
        cache_dir=str(tmp_path),
        device="cpu",
        text=None,
        prompt_tokens=8,
        decode_tokens=2,
        prefill_repeats=1,
        max_tokens=0,
        context=1024,
        stride=768,
        reference_path=None,
        is_reference=False,
    )
    events: list[dict] = []
    result = run_worker(spec, tmp_path / "worker.log", timeout=120, on_event=events.append)
    assert result.status == "failed"
    assert result.error.startswith("load: ")
    assert "missing-model" in result.error
    assert events == [{"event": "phase", "name": "load"}]


MACHINE = {
    "cpu_model": "Test CPU",
    "logical_cores": 2,
    "usable_cores": 2,
    "torch_threads": 2,
    "cpu_flags": ["avx2"],
    "torch_cpu_capability": "AVX2",
    "memory_bytes": 2**30,
    "torch": "2.13.0",
    "transformers": "5.0",
    "python": "3.11",
    "os": "Linux",
    "load_average": [1.0, 1.0, 1.0],
}


def _row(mode: str, **values) -> BenchRow:
    row = BenchRow(mode)
    row.update(values)
    return row


def test_ratios_use_the_reference_and_failures_are_reported(tmp_path: Path):
    options = BenchOptions(
        model="m", modes=("fp32", "int4"), text=None, max_tokens=10, out=tmp_path, device="cpu", cache_dir="c"
    )
    fp32 = _row("fp32", weight_bytes=400, perplexity=10.0)
    int4 = _row("int4", weight_bytes=100, perplexity=11.0)
    broken = _row("nf4")
    broken.fail("serve", "server exited with code 1: boom")
    run = BenchRun(options, rows=[fp32, int4, broken], reference=fp32, skipped={"bnb-nf4": "no bitsandbytes"})
    finish_figures(run)
    assert int4.weight_ratio == 0.25 and int4.fp32_weight_bytes == 400
    assert int4.perplexity_increase == pytest.approx(0.1)
    assert broken.weight_ratio is None

    report = render_markdown(results_document(run, MACHINE, "python -m tools.bench", "today"))
    assert "| nf4 (failed) |" in report
    assert "- `nf4`: serve: server exited with code 1: boom" in report
    assert "- `bnb-nf4`: no bitsandbytes" in report


def test_the_peer_engine_is_a_row_without_a_precision_mode(tmp_path: Path):
    options = BenchOptions(
        model="m", modes=("fp32",), text=None, max_tokens=10, out=tmp_path, device="cpu", cache_dir="c"
    )
    fp32 = _row("fp32", weight_bytes=400, perplexity=10.0)
    peer = BenchRow(None, engine=PEER_ENGINE)
    peer.update({"weight_bytes": 2**20, "decode_tok_s": 50.0})
    run = BenchRun(options, rows=[fp32, peer], reference=fp32)
    finish_figures(run)
    assert peer.weight_ratio is None and peer.fp32_weight_bytes is None  # another engine's file: no ratio
    assert (fp32.label, peer.label) == ("fp32", "llama.cpp")
    document = results_document(run, MACHINE, "python -m tools.bench", "today")
    assert [(row["mode"], row["engine"]) for row in document["rows"]] == [("fp32", ENGINE), (None, PEER_ENGINE)]
    assert BenchRow.from_dict(document["rows"][1]) == peer
    report = render_markdown(document)
    assert "| llama.cpp | 1.0 | – |" in report  # named by its engine: 1 MiB, no ratio
    assert report.split("## Time per phase (s)")[1].count("| llama.cpp | ") == 1
    with pytest.raises(ValueError, match="needs a precision mode"):
        BenchRow(None)
    with pytest.raises(ValueError, match="needs no precision mode"):
        BenchRow("fp32", engine=PEER_ENGINE)
    spec = WorkerSpec(
        mode=None,
        engine=PEER_ENGINE,
        model="m",
        cache_dir="c",
        device="cpu",
        text=None,
        prompt_tokens=8,
        decode_tokens=2,
        prefill_repeats=1,
        max_tokens=0,
        context=1024,
        stride=768,
        reference_path=None,
        is_reference=False,
    )
    assert WorkerSpec.from_json(spec.to_json()) == spec
    assert spec.empty_row() == BenchRow(None, engine=PEER_ENGINE)


def test_pareto_front_keeps_only_undominated_points():
    points = [(100.0, 12.0, "int4"), (400.0, 10.0, "fp32"), (200.0, 10.0, "bf16"), (120.0, 13.0, "nf4")]
    assert [p[2] for p in pareto_front(points)] == ["int4", "bf16"]
