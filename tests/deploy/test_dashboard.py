"""The Grafana dashboard: generated == committed, every query compares modes, every metric exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import generate_latest

import quant
from app.metrics import ServiceMetrics
from tests.deploy.sources import load_script

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "quantserve.json").read_text())


def targets(dashboard: dict) -> list[dict]:
    return [target for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_committed_json_is_what_the_generator_writes():
    committed = (GRAFANA / "dashboards" / "quantserve.json").read_text()
    assert load_script(GRAFANA / "dashboard.py").render() == committed, "run: python deploy/grafana/dashboard.py"


def test_precision_variable_is_multi_select_all_by_default(dashboard: dict):
    (precision,) = [v for v in dashboard["templating"]["list"] if v["name"] == "precision"]
    assert precision["multi"] and precision["includeAll"]
    assert precision["current"]["value"] == "$__all"
    assert precision["query"].startswith("label_values(qs_model_info")


def test_every_query_filters_and_groups_by_precision(dashboard: dict):
    for target in targets(dashboard):
        expr = target["expr"]
        assert 'precision=~"$precision"' in expr, expr
        grouped = re.findall(r"\bby \(([^)]*)\)", expr)
        assert target.get("format") == "table" or (grouped and all("precision" in g for g in grouped)), expr


def test_panels_the_issue_asks_for(dashboard: dict):
    exprs = " ".join(t["expr"] for t in targets(dashboard))
    for needed in (
        "histogram_quantile(0.5, sum by (precision, le) (rate(qs_time_to_first_token_seconds_bucket",
        "histogram_quantile(0.95, sum by (precision, le) (rate(qs_time_to_first_token_seconds_bucket",
        "histogram_quantile(0.95, sum by (precision, le) (rate(qs_time_per_output_token_seconds_bucket",
        "rate(qs_generated_tokens_total",
        "qs_e2e_request_latency_seconds_bucket",
        'error_type!="none"',
        "qs_requests_running",
        "qs_requests_waiting",
        "qs_model_weight_bytes",
        "qs_process_resident_memory_bytes",
        "qs_model_info",
    ):
        assert needed in exprs, needed
    assert any(p["type"] == "table" and "qs_model_info" in p["targets"][0]["expr"] for p in dashboard["panels"])


def test_quality_on_live_traffic_row(dashboard: dict):
    """Shadow scoring's panels: under their own row, each series labelled by mode and reference."""
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert "Quality on live traffic" in rows
    shadow = [t["expr"] for t in targets(dashboard) if "qs_shadow_" in t["expr"]]
    exprs = " ".join(shadow)
    for needed in (
        "rate(qs_shadow_top1_agreements_total",
        "qs_shadow_kl_divergence_bucket",
        "qs_shadow_kl_divergence_sum",
        "qs_shadow_first_divergence_position_bucket",
        "qs_shadow_replays_total",
    ):
        assert needed in exprs, needed
    assert all("by (precision, reference" in e or "outcome" in e for e in shadow), shadow


def test_layout_fits_the_grid_and_ids_are_unique(dashboard: dict):
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def exported_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every series name the service exports, CUDA ones included (their torch calls stubbed)."""
    for fn in ("memory_allocated", "max_memory_allocated", "memory_reserved"):
        monkeypatch.setattr(torch.cuda, fn, lambda device=None: 1)
    metrics = ServiceMetrics(model="m", precision="int8")
    report = quant.QuantReport(mode="int8", backend="torch", bits=8, group_size=None, compute_dtype="float32")
    metrics.set_model_info(report, torch.device("cuda:0"))
    metrics.observe_request("/generate", 200, "none", 0.1)
    metrics.for_mode("int4").start_shadow("fp32")  # a multi-mode process with shadow scoring
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0] for line in text.splitlines() if line.startswith("qs_")}


def test_every_metric_in_the_dashboard_is_exported(dashboard: dict, monkeypatch: pytest.MonkeyPatch):
    used = {name for t in targets(dashboard) for name in re.findall(r"\bqs_[a-z0-9_]+", t["expr"])}
    used |= {name for v in dashboard["templating"]["list"] for name in re.findall(r"\bqs_[a-z0-9_]+", v["query"])}
    assert used - exported_names(monkeypatch) == set()


def test_provisioning_points_at_the_dashboards_and_prometheus():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana_mounts = dict(m.split(":")[:2] for m in compose["services"]["grafana"]["volumes"])
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "quantserve.yml").read_text())["providers"]
    assert grafana_mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
