"""Write a benchmark run as results.json, report.md and PNG charts."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quant import REFERENCE_MODE
from quant.checkpoints import DEFAULT_MODEL, DEFAULT_MODEL_ID
from tools.bench.compare import RATIO_FIELDS, counterpart_pairs, unpaired_modes
from tools.bench.results import PEER_ENGINE, BenchRow
from tools.bench.run import BenchRun

MIB = 2**20
CHARTS = {
    "decode": "decode_tok_s.png",
    "bytes": "weight_bytes.png",
    "frontier": "quality_vs_bytes.png",
    "latency": "latency.png",
}


def results_document(run: BenchRun, machine: dict[str, Any], command: str, created: str) -> dict[str, Any]:
    options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run.options).items()}
    return {
        "command": command,
        "created": created,
        "model": run.options.model,
        "model_id": DEFAULT_MODEL_ID if run.options.model == DEFAULT_MODEL else run.options.model,
        "reference_mode": REFERENCE_MODE,
        "machine": machine,
        "options": options,
        "reference": run.reference.to_dict() if run.reference else None,
        "rows": [row.to_dict() for row in run.rows],
        "comparison": [pair.to_dict() for pair in counterpart_pairs(run.rows)],  # ours / llama.cpp
        "skipped": run.skipped,
        "seconds": run.seconds,
        "charts": CHARTS,
    }


def write_report(run: BenchRun, machine: dict[str, Any], command: str, created: str) -> Path:
    """Write every output into `run.options.out`; return the path of report.md."""
    out = run.options.out
    out.mkdir(parents=True, exist_ok=True)
    document = results_document(run, machine, command, created)
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    write_charts(run.rows, out)
    path = out / "report.md"
    path.write_text(render_markdown(document))
    return path


# --- markdown -------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / MIB:,.1f}"


def _ms_pair(p50: float | None, p95: float | None) -> str:
    if p50 is None or p95 is None:
        return "–"
    return f"{p50 * 1e3:,.0f} / {p95 * 1e3:,.0f}"


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.2f}%" if signed else f"{value * 100:.1f}%"


TABLE_HEADER = (
    "| mode | weights MiB | × fp32 | peak RSS MiB | load s | quantize s | prefill tok/s | decode tok/s | "
    "1-stream tok/s | {concurrency}-stream tok/s | TTFT p50/p95 ms | TPOT p50/p95 ms | perplexity | Δ ppl | "
    "top-1 agree | KL mean | KL p99 |\n"
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
)


def table_row(row: BenchRow) -> str:
    mode = row.label if row.status == "ok" else f"{row.label} (failed)"
    cells = [
        mode,
        _mib(row.weight_bytes),
        _num(row.weight_ratio, 3),
        _mib(row.peak_rss_bytes),
        _num(row.load_seconds),
        _quantize_seconds(row),
        _num(row.prefill_tok_s),
        _num(row.decode_tok_s),
        _num(row.single_stream_tok_s),
        _num(row.serve_tok_s),
        _ms_pair(row.ttft_p50_s, row.ttft_p95_s),
        _ms_pair(row.tpot_p50_s, row.tpot_p95_s),
        _num(row.perplexity, 3),
        _percent(row.perplexity_increase, signed=True),
        _percent(row.top1_agreement),
        _num(row.kl_mean, 4),
        _num(row.kl_p99, 4),
    ]
    return "| " + " | ".join(cells) + " |\n"


def _quantize_seconds(row: BenchRow) -> str:
    """The quantization time, with the calibration's own when the mode calibrates (what a first start pays)."""
    text = _num(row.quantize_seconds, 2)
    return text if row.calibration_seconds is None else f"{text} (calibration {row.calibration_seconds:.1f})"


def render_table(rows: list[BenchRow], concurrency: int) -> str:
    return TABLE_HEADER.format(concurrency=concurrency) + "".join(table_row(row) for row in rows)


def _loads(values: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values) or "unknown"


PHASES = ("load", "prefill", "decode", "quality", "serve")
PEER_PHASES = ("quantize", "llama-bench")  # a peer row's phases besides serve


def render_phase_table(rows: list[BenchRow]) -> str:
    """Where the run's time went, per mode (this is what a time budget for the comparison is made of)."""
    phases = PHASES + (PEER_PHASES if any(row.is_peer for row in rows) else ())
    lines = [
        "| mode | " + " | ".join(phases) + " | total |",
        "|---|" + "--:|" * (len(phases) + 1),
    ]
    for row in rows:
        cells = [_num(row.phase_seconds.get(phase), 0) for phase in phases]
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {sum(row.phase_seconds.values()):,.0f} |")
    return "\n".join(lines) + "\n"


def _machine_lines(machine: dict[str, Any]) -> list[str]:
    memory = machine.get("memory_bytes")
    lines = [
        f"- CPU: {machine['cpu_model']}; {machine['usable_cores']} usable of {machine['logical_cores']} logical cores; "
        f"torch threads: {machine['torch_threads']}",
        f"- CPU flags: {', '.join(machine['cpu_flags']) or 'none of interest'}; "
        f"torch CPU capability: {machine['torch_cpu_capability']}",
        f"- memory: {memory / 2**30:.1f} GiB" if memory else "- memory: unknown",
        f"- torch {machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}, "
        f"{machine['os']}",
        f"- load average (1, 5, 15 min) at the start: {_loads(machine['load_average'])}; "
        f"at the end: {_loads(machine.get('load_average_end', []))}",
    ]
    if max(machine["load_average"] + machine.get("load_average_end", []), default=0) > machine["usable_cores"]:
        lines.append("- the load exceeded the cores: other work shared the CPU and slowed some phases of this run")
    if "cuda_device" in machine:
        lines.append(f"- CUDA: {machine['cuda_device']} (CUDA {machine['cuda_version']})")
    return lines


def _duration(seconds: float | None) -> str:
    return "an unknown time" if seconds is None else f"{seconds / 60:.1f} min"


def _model_label(document: dict[str, Any]) -> str:
    model, model_id = document["model"], document["model_id"]
    return f"`{model}`" if model == model_id else f"{model_id} (`{model}`)"


def render_markdown(document: dict[str, Any]) -> str:
    options = document["options"]
    rows = [BenchRow.from_dict(r) for r in document["rows"]]
    parts = [
        "# Precision modes compared: speed, memory and quality\n",
        f"Model: {_model_label(document)}, device `{options['device']}`, {document['created']}; "
        f"the whole run took {_duration(document['seconds'])}.\n",
        f"Command:\n\n```\n{document['command']}\n```\n",
        render_table(rows, options["concurrency"]),
    ]
    failed = [row for row in rows if row.status != "ok"]
    if failed:
        parts.append("\nFailed:\n\n" + "".join(f"- `{row.label}`: {row.error}\n" for row in failed))
    if document["skipped"]:
        parts.append("\nNot run:\n\n" + "".join(f"- `{name}`: {why}\n" for name, why in document["skipped"].items()))
    reference = document["reference"]
    if reference and reference["status"] != "ok":
        parts.append(f"\nThe {REFERENCE_MODE} reference failed ({reference['error']}): no ratios or agreement.\n")
    parts.append(render_reference_ratios(rows, options["concurrency"]))
    if any(row.is_peer for row in rows) or PEER_ENGINE in document["skipped"]:
        parts.append(render_peer_section(rows, options, document["machine"]))
    parts.append(_method(options, document))
    parts.append("\n## Time per phase (s)\n\n" + render_phase_table(rows))
    parts.append("\n## Machine\n\n" + "\n".join(_machine_lines(document["machine"])) + "\n")
    parts.append("\n## Charts\n\n" + "".join(f"![{name}]({file})\n" for name, file in document["charts"].items()))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(parts))  # sections bring their own blank lines


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def render_comparison(rows: list[BenchRow], concurrency: int) -> str:
    """Each of our modes next to its llama.cpp counterpart: ours / theirs, and the ratio."""
    names = {"N streams": f"{concurrency} streams"}
    header = "| mode | llama.cpp | " + " | ".join(
        f"{names.get(column, column)} tok/s: ours / llama.cpp = ×" for _, column in RATIO_FIELDS
    )
    lines = [header + " |", "|---|---|" + "--:|" * len(RATIO_FIELDS)]
    for pair in counterpart_pairs(rows):
        cells = [pair.ours.label, pair.theirs.gguf_type or "?"]
        for name, _ in RATIO_FIELDS:
            ours, theirs = getattr(pair.ours, name), getattr(pair.theirs, name)
            cells.append(f"{_num(ours)} / {_num(theirs)} = {_ratio(pair.ratio(name))}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Pairs whose ratio says whether a lookup format's kernel keeps up with its integer neighbour
# at the same bits: fp8 with int8, nf4 with int4.
NEIGHBOUR_PAIRS = (("fp8", "int8"), ("nf4", "int4"))


def _speed_ratio(ours: BenchRow, theirs: BenchRow | None, name: str) -> float | None:
    a, b = getattr(ours, name), None if theirs is None else getattr(theirs, name)
    return None if a is None or not b else a / b


def render_reference_ratios(rows: list[BenchRow], concurrency: int) -> str:
    """Each mode's speed as a multiple of the reference mode's, measured in this run."""
    ours = {row.mode: row for row in rows if not row.is_peer and row.status == "ok"}
    reference = ours.get(REFERENCE_MODE)
    if reference is None:
        return ""
    names = {"N streams": f"{concurrency} streams"}
    lines = [
        f"\n## Against {REFERENCE_MODE}, same run (× its tok/s)\n",
        "| mode | " + " | ".join(names.get(column, column) for _, column in RATIO_FIELDS) + " |",
        "|---|" + "--:|" * len(RATIO_FIELDS),
    ]
    for mode, row in ours.items():
        lines.append(
            f"| {mode} | " + " | ".join(_ratio(_speed_ratio(row, reference, n)) for n, _ in RATIO_FIELDS) + " |"
        )
    pairs = [(a, b) for a, b in NEIGHBOUR_PAIRS if a in ours and b in ours]
    if pairs:
        lines.append("\nSame bits, lookup against integer kernels (× the second mode's tok/s):\n")
        for a, b in pairs:
            cells = ", ".join(f"{names.get(c, c)} {_ratio(_speed_ratio(ours[a], ours[b], n))}" for n, c in RATIO_FIELDS)
            lines.append(f"- `{a}` / `{b}`: {cells}")
    return "\n".join(lines) + "\n"


def _stat(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "–"
    return f"{stat['avg_ts']:,.1f} ± {stat['stddev_ts']:,.1f} ({stat['median_ts']:,.1f})"


def render_peer_table(rows: list[BenchRow]) -> str:
    """What llama-bench gave for each peer file (mean ± sd, median in brackets) and how each file was made."""
    lines = [
        "| llama.cpp file | made | weights MiB | CPU back end | prefill tok/s | decode tok/s |",
        "|---|---|--:|---|--:|--:|",
    ]
    for row in rows:
        if not row.is_peer:
            continue
        bench = row.peer.get("llama_bench", {})
        label = row.gguf_type if row.status == "ok" else f"{row.gguf_type} (failed)"
        cells = [label, row.peer.get("made", "–"), _mib(row.weight_bytes), row.backend or "–"]
        cells += [_stat(bench.get("prefill")), _stat(bench.get("decode"))]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _cpu_line(machine: dict[str, Any]) -> str:
    flags = ", ".join(machine.get("cpu_flags") or []) or "none of interest"
    return f"{machine['cpu_model']} ({flags})"


def render_peer_section(rows: list[BenchRow], options: dict[str, Any], machine: dict[str, Any]) -> str:
    peers = [row for row in rows if row.is_peer]
    backends = sorted({row.backend for row in peers if row.backend})
    parts = [
        f"\n## Against {PEER_ENGINE}, measured in the same run\n",
        f"CPU: {_cpu_line(machine)}. llama.cpp from `{options['llama_cpp']}`, "
        f"{options['llama_cpp_threads']} threads, CPU back end loaded: {', '.join(backends) or 'not named in its log'}.\n",
    ]
    if not peers:
        parts.append("No llama.cpp row was measured (see *Not run*).\n")
        return "\n".join(parts)
    if counterpart_pairs(rows):
        parts.append(render_comparison(rows, options["concurrency"]))
    unpaired = unpaired_modes(rows)
    if unpaired:
        parts.append(f"No llama.cpp counterpart: {', '.join(unpaired)}.\n")
    parts.append(
        f"\nllama-bench (`-t {options['llama_cpp_threads']} -p {options['prompt_tokens']} "
        f"-n {options['decode_tokens']} -r {options['llama_cpp_repeats']}`): mean ± sd over its repetitions, "
        "median in brackets; the ratios above use the mean.\n"
    )
    parts.append(render_peer_table(rows))
    return "\n".join(parts)


def _method(options: dict[str, Any], document: dict[str, Any]) -> str:
    text = options["text"] or "the quality tool's default text (Python's `pydoc_data.topics`)"
    lines = [
        "\n## How each figure is measured\n",
        "- Each mode runs in its own worker process (`tools.bench.worker`), loaded exactly as the service loads it.",
        "- **weights MiB**: parameters and buffers after quantization (the mode's QuantReport); "
        f"**× fp32**: that over the same model in {REFERENCE_MODE}, both measured in this run.",
        "- **peak RSS**: the worker's peak resident memory (getrusage) after load, prefill and decode, "
        "before the quality pass.",
        "- **load s**: reading the float checkpoint and quantizing it.",
        f"- **prefill tok/s**: one {options['prompt_tokens']}-token prompt, best of {options['prefill_repeats']}; "
        f"**decode tok/s**: {options['decode_tokens']} greedy steps at batch 1 after an 8-token prompt, "
        "through the engine's model runner, EOS ignored.",
        f"- **1-stream tok/s**, **{options['concurrency']}-stream tok/s**, TTFT, TPOT: the real `quantserve` process "
        f"for the mode on a loopback port, one stream, then {options['concurrency']} concurrent streams, of "
        f"{options['stream_tokens']} tokens each (greedy, EOS ignored), driven by the load generator "
        "(`tools.loadgen`); tok/s is generated tokens over wall time; TTFT and TPOT (the time per output token "
        "after the first) are those of the concurrent streams.",
        f"- **perplexity**, **top-1 agree** (share of positions whose most likely next token equals {REFERENCE_MODE}'s): "
        f"`tools.quality` over the first {options['max_tokens']} tokens of {text}; Δ ppl is relative to "
        f"{REFERENCE_MODE}. **KL mean**, **KL p99**: KL({REFERENCE_MODE} ‖ mode) of the next-token distributions "
        "at each scored position, in nats (as llama.cpp's `--kl-divergence`), exact: the reference's float32 "
        "log-probabilities are kept in a temporary file.",
        "- **quantize s**: the quantization alone, inside load s (a calibrated mode's calibration, or the read of "
        "its cache, included; its calibration time in brackets).",
        "- Timings come from one run on a shared machine: compare modes within this table, not across runs.",
    ]
    if options.get("llama_cpp"):
        lines += [
            f"- **{PEER_ENGINE} rows** (no precision mode; named by file type): F32, Q8_0 and Q4_0 made from the "
            "model's GGUF with `llama-quantize --allow-requantize` (speed comparisons only; cached under the "
            "cache directory), and the GGUF as shipped. Weights MiB is llama-bench's model size; prefill and "
            f"decode are `llama-bench -p {options['prompt_tokens']} -n {options['decode_tokens']}` (random "
            "tokens, decode from an empty context, after its warm-up); the stream rows come from "
            f"`llama-server -np {options['concurrency']} -c {options['llama_cpp_context']}`, "
            "driven by the same load generator as our server.",
            "- Pairs: fp32 ↔ F32, int8 ↔ Q8_0, int4 ↔ Q4_0 and Q4_1; ratios are ours / llama.cpp's. Our "
            "prefill is the best of its runs and our decode one run; llama.cpp's are llama-bench's means.",
        ]
    if document["model"] == DEFAULT_MODEL:
        lines.append(
            "- The default model's float weights are de-quantized from a Q4_1 GGUF (a 4-bit grid, group 32): "
            "4-bit modes with group 32 land almost on that grid, which flatters their quality here."
        )
    return "\n".join(lines) + "\n"


# --- charts -----------------------------------------------------------------


def _plotted(rows: list[BenchRow], *fields: str) -> list[BenchRow]:
    return [row for row in rows if all(getattr(row, f) is not None for f in fields)]


def write_charts(rows: list[BenchRow], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    charts = (
        (CHARTS["decode"], _decode_chart),
        (CHARTS["bytes"], _bytes_chart),
        (CHARTS["frontier"], _frontier_chart),
        (CHARTS["latency"], _latency_chart),
    )
    for file, draw in charts:
        figure = draw(plt, rows)
        figure.tight_layout()
        figure.savefig(out / file, dpi=110)
        plt.close(figure)


def _empty(axes: Any, what: str) -> None:
    axes.text(0.5, 0.5, f"no {what} measured", ha="center", va="center", transform=axes.transAxes)


def _decode_chart(plt: Any, rows: list[BenchRow]) -> Any:
    figure, axes = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    shown = [row for row in rows if row.decode_tok_s is not None or row.serve_tok_s is not None]
    if not shown:
        _empty(axes, "decode speed")
        return figure
    positions = range(len(shown))
    width = 0.4
    single = [row.decode_tok_s or 0 for row in shown]
    streams = [row.serve_tok_s or 0 for row in shown]
    axes.bar([p - width / 2 for p in positions], single, width, label="batch 1 (worker)")
    concurrency = next((row.serve_concurrency for row in shown if row.serve_concurrency), None)
    axes.bar([p + width / 2 for p in positions], streams, width, label=f"{concurrency or '?'} streams (server)")
    axes.set_xticks(list(positions), [row.label for row in shown], rotation=30, ha="right")
    axes.set_ylabel("generated tokens / s")
    axes.set_title("Decode throughput per mode")
    axes.legend()
    return figure


def _bytes_chart(plt: Any, rows: list[BenchRow]) -> Any:
    figure, axes = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    shown = _plotted(rows, "weight_bytes")
    if not shown:
        _empty(axes, "weight size")
        return figure
    bars = axes.bar([row.label for row in shown], [row.weight_bytes / MIB for row in shown])
    for bar, row in zip(bars, shown, strict=True):
        if row.weight_ratio is not None:
            axes.annotate(
                f"{row.weight_ratio:.2f}×",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    axes.set_ylabel("weight MiB")
    axes.set_title(f"Weight bytes per mode (label: ratio to {REFERENCE_MODE})")
    axes.tick_params(axis="x", rotation=30)
    return figure


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (bytes, perplexity, mode) that no other point beats on both: smaller and better."""
    front, best = [], float("inf")
    for point in sorted(points):
        if point[1] < best:
            front.append(point)
            best = point[1]
    return front


def _frontier_chart(plt: Any, rows: list[BenchRow]) -> Any:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    shown = _plotted(rows, "weight_bytes", "perplexity")
    if not shown:
        _empty(axes, "perplexity")
        return figure
    points = [(row.weight_bytes / MIB, row.perplexity, row.label) for row in shown]
    axes.scatter([p[0] for p in points], [p[1] for p in points])
    for x, y, mode in points:
        axes.annotate(mode, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(points)
    axes.plot([p[0] for p in front], [p[1] for p in front], "--", label="frontier (nothing smaller is better)")
    axes.set_xlabel("weight MiB")
    axes.set_ylabel("perplexity (lower is better)")
    axes.set_title("Quality vs size")
    axes.legend()
    return figure


def _latency_chart(plt: Any, rows: list[BenchRow]) -> Any:
    figure, (ttft_axes, tpot_axes) = plt.subplots(1, 2, figsize=(max(8, len(rows) * 1.4), 4))
    shown = _plotted(rows, "ttft_p50_s", "ttft_p95_s", "tpot_p50_s", "tpot_p95_s")
    if not shown:
        _empty(ttft_axes, "latency")
        _empty(tpot_axes, "latency")
        return figure
    positions = range(len(shown))
    width = 0.4
    labels = [row.label for row in shown]
    for axes, name, p50, p95 in (
        (ttft_axes, "Time to first token", "ttft_p50_s", "ttft_p95_s"),
        (tpot_axes, "Time per output token", "tpot_p50_s", "tpot_p95_s"),
    ):
        axes.bar([p - width / 2 for p in positions], [getattr(r, p50) * 1e3 for r in shown], width, label="p50")
        axes.bar([p + width / 2 for p in positions], [getattr(r, p95) * 1e3 for r in shown], width, label="p95")
        axes.set_xticks(list(positions), labels, rotation=30, ha="right")
        axes.set_ylabel("ms")
        axes.set_title(name)
        axes.legend()
    return figure
