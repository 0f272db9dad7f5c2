"""docker-compose.yml and the Prometheus config it mounts, checked offline.

The compose file is validated against the Compose Specification's JSON schema
(vendored by check-jsonschema); Prometheus' config by its own `promtool` when
installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import quant
from tests.deploy.sources import ROOT, arguments, assignments
from tests.support.modes import REQUIRED_DEPLOYED_MODES

COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def quantserve_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if name.startswith("quantserve-")}


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_file_matches_the_compose_specification():
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_misspelt_key(tmp_path: Path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    healthchek:", 1))
    result = check_compose_schema(broken)
    assert result.returncode != 0 and "healthchek" in result.stdout


def test_one_service_per_mode_from_one_image(compose: dict):
    services = quantserve_services(compose)
    modes = {s["environment"]["QS_PRECISION"] for s in services.values()}
    assert modes >= REQUIRED_DEPLOYED_MODES
    assert modes <= set(quant.list_modes())
    assert {name.removeprefix("quantserve-") for name in services} == modes
    assert len({s["image"] for s in services.values()}) == 1
    host_ports = [p.split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))


def test_services_share_the_model_cache_volume(compose: dict):
    cache_dir = assignments("ENV")["QS_CACHE_DIR"]
    for name, service in quantserve_services(compose).items():
        assert f"model-cache:{cache_dir}" in service["volumes"], name
    assert "model-cache" in compose["volumes"]


def test_every_service_has_a_health_check(compose: dict):
    assert arguments("HEALTHCHECK"), "quantserve services inherit the image's HEALTHCHECK command"
    for name, service in compose["services"].items():
        health = service["healthcheck"]
        assert health["interval"] and health["retries"], name
        assert name.startswith("quantserve-") or health["test"][0] == "CMD", name


def test_prometheus_scrapes_every_mode(compose: dict):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "quantserve"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    port = assignments("ENV")["QS_PORT"]
    assert targets == {f"{name}:{port}" for name in quantserve_services(compose)}
    mounts = dict(m.split(":")[:2] for m in compose["services"]["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


def test_mounted_paths_exist(compose: dict):
    for service in compose["services"].values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), mount


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus package")
def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_waits_for_a_healthy_prometheus(compose: dict):
    assert compose["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert Path(ROOT / "deploy" / "grafana" / "dashboards" / "quantserve.json").exists()


def seconds(duration: str) -> float:
    """A compose duration such as `40s` or `1m30s`."""
    total, number = 0.0, ""
    for char in duration:
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[char]
            number = ""
    return total


def test_stop_grace_period_covers_the_drain(compose: dict):
    from app.main import RESPONSE_FLUSH_SECONDS
    from app.settings import Settings

    default = Settings.model_fields["shutdown_timeout"].default
    for name, service in quantserve_services(compose).items():
        shutdown_timeout = float(service["environment"].get("QS_SHUTDOWN_TIMEOUT", default))
        assert seconds(service["stop_grace_period"]) > shutdown_timeout + RESPONSE_FLUSH_SECONDS, name
