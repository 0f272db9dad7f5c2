"""The quantserve Grafana dashboard, as code (grafanalib).

Puts precision modes side by side: every query groups by `precision`, and the
`precision` variable (multi-select, all by default) picks the modes shown.

    python deploy/grafana/dashboard.py            # rewrite dashboards/quantserve.json
    python deploy/grafana/dashboard.py --check    # exit 1 if the committed JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    Dashboard,
    GridPos,
    Panel,
    RowPanel,
    Table,
    TableSortByField,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)

OUTPUT = Path(__file__).parent / "dashboards" / "quantserve.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Series of the chosen model(s) and precision mode(s); every query below uses it.
SELECTOR = 'model=~"$model", precision=~"$precision"'
RATE = "$__rate_interval"
# Probes and introspection would drown the request rate of a lightly loaded service.
API_ROUTES = 'route!~"/health|/info"'
PANEL_WIDTH, PANEL_HEIGHT = 8, 8


def rate_by_precision(metric: str, matchers: str = "") -> str:
    selector = f"{SELECTOR}, {matchers}" if matchers else SELECTOR
    return f"sum by (precision) (rate({metric}{{{selector}}}[{RATE}]))"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (precision, le) (rate({histogram}_bucket{{{SELECTOR}}}[{RATE}])))"


def quantile_targets(histogram: str, quantiles: tuple[float, ...] = (0.5, 0.95)) -> list[Target]:
    return [
        Target(expr=quantile(q, histogram), legendFormat=f"{{{{precision}}}} p{round(q * 100)}", refId=chr(65 + i))
        for i, q in enumerate(quantiles)
    ]


def gauge_by_precision(metric: str, legend: str = "{{precision}}", ref: str = "A") -> Target:
    return Target(expr=f"sum by (precision) ({metric}{{{SELECTOR}}})", legendFormat=legend, refId=ref)


def series(title: str, description: str, targets: list[Target], unit: str) -> TimeSeries:
    return TimeSeries(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=targets,
        unit=unit,
        legendDisplayMode="table",
        legendCalcs=["lastNotNull", "max"],
        tooltipMode="multi",
        maxDataPoints=None,
    )


def latency_panels() -> list[Panel]:
    return [
        series(
            "Time to first token",
            "p50 and p95 from arrival to the first generated token (queue + prefill)",
            quantile_targets("qs_time_to_first_token_seconds"),
            "s",
        ),
        series(
            "Time per output token",
            "p50 and p95 of each request's mean time between generated tokens (decode speed)",
            quantile_targets("qs_time_per_output_token_seconds"),
            "s",
        ),
        series(
            "End-to-end latency",
            "p50 and p95 from arrival to the last token",
            quantile_targets("qs_e2e_request_latency_seconds"),
            "s",
        ),
    ]


def throughput_panels() -> list[Panel]:
    requests = rate_by_precision("qs_requests_total", API_ROUTES)
    errors = rate_by_precision("qs_requests_total", f'{API_ROUTES}, error_type!="none"')
    return [
        series(
            "Generated tokens per second",
            "Output throughput of each mode, from the generated-token counter",
            [
                Target(expr=rate_by_precision("qs_generated_tokens_total"), legendFormat="{{precision}}", refId="A"),
            ],
            "short",
        ),
        series(
            "Prompt tokens per second",
            "Prefill throughput of each mode, from the prompt-token counter",
            [Target(expr=rate_by_precision("qs_prompt_tokens_total"), legendFormat="{{precision}}", refId="A")],
            "short",
        ),
        series(
            "Request rate",
            "API requests per second (health and info probes left out)",
            [Target(expr=requests, legendFormat="{{precision}}", refId="A")],
            "reqps",
        ),
        series(
            "Error rate",
            "Share of API requests answered with an error; 0 while a mode has none",
            # `or ... * 0` keeps a mode with no errors on the chart at 0 instead of dropping it.
            [Target(expr=f"({errors} or {requests} * 0) / {requests}", legendFormat="{{precision}}", refId="A")],
            "percentunit",
        ),
        series(
            "Errors by type",
            "API errors per second by error_type (validation, overloaded, unavailable, ...)",
            [
                Target(
                    expr=(
                        f"sum by (precision, error_type) (rate(qs_requests_total"
                        f'{{{SELECTOR}, {API_ROUTES}, error_type!="none"}}[{RATE}]))'
                    ),
                    legendFormat="{{precision}} {{error_type}}",
                    refId="A",
                )
            ],
            "reqps",
        ),
        series(
            "Engine failures",
            "Engine faults (a model step raised or the worker died; /health then says failed): restart the process",
            [
                Target(
                    expr=f"sum by (precision) (increase(qs_engine_failures_total{{{SELECTOR}}}[{RATE}]))",
                    legendFormat="{{precision}}",
                    refId="A",
                )
            ],
            "short",
        ),
        series(
            "Queue time",
            "p50 and p95 wait before a request's prefill",
            quantile_targets("qs_queue_time_seconds"),
            "s",
        ),
    ]


def scheduler_panels() -> list[Panel]:
    batch_sum = rate_by_precision("qs_batch_size_sum")
    batch_count = rate_by_precision("qs_batch_size_count")
    return [
        series(
            "Requests running and waiting",
            "Sequences in the running batch and requests queued for a slot",
            [
                gauge_by_precision("qs_requests_running", "{{precision}} running", "A"),
                gauge_by_precision("qs_requests_waiting", "{{precision}} waiting", "B"),
            ],
            "short",
        ),
        series(
            "Mean batch size",
            "Sequences per decode step, averaged over the interval",
            [Target(expr=f"{batch_sum} / {batch_count}", legendFormat="{{precision}}", refId="A")],
            "short",
        ),
    ]


def memory_panels() -> list[Panel]:
    return [
        series(
            "Weight bytes",
            "Bytes of the loaded model's weights (quantized layers, scales and float parts)",
            [gauge_by_precision("qs_model_weight_bytes")],
            "bytes",
        ),
        series(
            "Resident memory",
            "Process resident set now, its peak since start, and the file-backed part of it "
            "(the memory-mapped checkpoint and libraries: clean pages the kernel can reclaim)",
            [
                gauge_by_precision("qs_process_resident_memory_bytes", "{{precision}} now", "A"),
                gauge_by_precision("qs_process_resident_memory_peak_bytes", "{{precision}} peak", "B"),
                gauge_by_precision("qs_process_resident_memory_file_bytes", "{{precision}} file-backed", "C"),
            ],
            "bytes",
        ),
        series(
            "CUDA memory",
            "Allocated by tensors and reserved by the caching allocator (CUDA devices only)",
            [
                gauge_by_precision("qs_cuda_memory_allocated_bytes", "{{precision}} allocated", "A"),
                gauge_by_precision("qs_cuda_memory_reserved_bytes", "{{precision}} reserved", "B"),
            ],
            "bytes",
        ),
    ]


def shadow_rate(metric: str, matchers: str = "") -> str:
    selector = f"{SELECTOR}, {matchers}" if matchers else SELECTOR
    return f"sum by (precision, reference) (rate({metric}{{{selector}}}[{RATE}]))"


def shadow_quantile(q: float, histogram: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (precision, reference, le) (rate({histogram}_bucket{{{SELECTOR}}}[{RATE}])))"
    )


SHADOW_LEGEND = "{{precision}} vs {{reference}}"


def quality_panels() -> list[Panel]:
    """Shadow scoring (QS_SHADOW_REFERENCE): sampled live answers of each mode replayed on the reference."""
    tokens = shadow_rate("qs_shadow_tokens_total")
    scored = shadow_rate("qs_shadow_replays_total", 'outcome="scored"')
    return [
        series(
            "Top-1 agreement with the reference",
            "Share of scored tokens whose most likely next token is the reference mode's too (sampled live requests)",
            [
                Target(
                    expr=f"{shadow_rate('qs_shadow_top1_agreements_total')} / {tokens}",
                    legendFormat=SHADOW_LEGEND,
                    refId="A",
                )
            ],
            "percentunit",
        ),
        series(
            "KL divergence per token",
            "KL(reference || mode) of each scored token's next-token distribution, nats: mean and p95",
            [
                Target(
                    expr=f"{shadow_rate('qs_shadow_kl_divergence_sum')} / {shadow_rate('qs_shadow_kl_divergence_count')}",
                    legendFormat=f"{SHADOW_LEGEND} mean",
                    refId="A",
                ),
                Target(
                    expr=shadow_quantile(0.95, "qs_shadow_kl_divergence"),
                    legendFormat=f"{SHADOW_LEGEND} p95",
                    refId="B",
                ),
            ],
            "short",
        ),
        series(
            "First divergence from the reference's greedy path",
            "Median position of the first generated token the reference would not have chosen greedily "
            "(answers that diverge), and the share of answers that diverge at all",
            [
                Target(
                    expr=shadow_quantile(0.5, "qs_shadow_first_divergence_position"),
                    legendFormat=f"{SHADOW_LEGEND} p50 position",
                    refId="A",
                ),
                Target(
                    expr=f"{shadow_rate('qs_shadow_first_divergence_position_count')} / {scored}",
                    legendFormat=f"{SHADOW_LEGEND} share diverged",
                    refId="B",
                ),
            ],
            "short",
        ),
        series(
            "Shadow replays",
            "Replays per second by outcome: scored, failed (counted and dropped) or dropped (queue full)",
            [
                Target(
                    expr=f"sum by (precision, outcome) (rate(qs_shadow_replays_total{{{SELECTOR}}}[{RATE}]))",
                    legendFormat="{{precision}} {{outcome}}",
                    refId="A",
                )
            ],
            "reqps",
        ),
    ]


def info_table() -> Table:
    return Table(
        title="Loaded models",
        description="qs_model_info: one row per running mode",
        dataSource=DATASOURCE,
        targets=[Target(expr=f"qs_model_info{{{SELECTOR}}}", format="table", instant=True, refId="A")],
        transformations=[
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "Value": True, "__name__": True},
                    "indexByName": {
                        "precision": 0,
                        "bits": 1,
                        "group_size": 2,
                        "backend": 3,
                        "kernel": 4,
                        "device": 5,
                        "compute_dtype": 6,
                        "model": 7,
                        "instance": 8,
                        "job": 9,
                    },
                },
            }
        ],
        sortBy=[TableSortByField(displayName="precision")],
        maxDataPoints=None,
    )


def laid_out(sections: list[tuple[str, list[Panel], int]]) -> list[Panel]:
    """Each section under its own row header, its panels `width` wide, wrapping at 24 columns."""
    panels: list[Panel] = []
    y = 0
    for title, section, width in sections:
        panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        for i, panel in enumerate(section):
            x = (i * width) % 24
            if i and x == 0:
                y += PANEL_HEIGHT
            panel.gridPos = GridPos(h=PANEL_HEIGHT, w=width, x=x, y=y)
            panels.append(panel)
        y += PANEL_HEIGHT
    return panels


def variable(name: str, label: str, query: str) -> Template:
    return Template(
        name=name,
        label=label,
        query=query,
        dataSource=DATASOURCE,
        multi=True,
        includeAll=True,
        allValue=".*",  # "All" also matches a mode started after the page loaded
        default="$__all",
        refresh=2,  # on time-range change: a newly started mode shows up
        sort=1,
    )


def build() -> Dashboard:
    return Dashboard(
        title="quantserve: precision modes side by side",
        uid="quantserve-modes",
        description="Latency, throughput, errors, batching, memory and quality on live traffic of each precision mode",
        tags=["quantserve", "llm"],
        timezone="browser",
        refresh="10s",
        time=Time("now-30m", "now"),
        templating=Templating(
            list=[
                Template(name="datasource", label="Data source", query="prometheus", type="datasource"),
                variable("model", "Model", "label_values(qs_model_info, model)"),
                variable("precision", "Precision", 'label_values(qs_model_info{model=~"$model"}, precision)'),
            ]
        ),
        panels=laid_out(
            [
                ("Modes", [info_table()], 24),
                ("Latency", latency_panels(), PANEL_WIDTH),
                ("Throughput and errors", throughput_panels(), PANEL_WIDTH),
                ("Scheduler", scheduler_panels(), 12),
                ("Memory", memory_panels(), PANEL_WIDTH),
                ("Quality on live traffic", quality_panels(), 12),
            ]
        ),
    ).auto_panel_ids()


def render() -> str:
    return json.dumps(build().to_json_data(), cls=DashboardEncoder, sort_keys=True, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    args = parser.parse_args()
    rendered = render()
    if args.check:
        if OUTPUT.read_text() != rendered:
            print(f"{OUTPUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(rendered)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
