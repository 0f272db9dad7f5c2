"""deploy/k8s: generated == committed, schema-valid offline (kubernetes-validate), consistent with the image."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

import quant
from tests.deploy.sources import ROOT, arguments, assignments, load_script
from tests.support.modes import REQUIRED_DEPLOYED_MODES

K8S = ROOT / "deploy" / "k8s"
# The oldest release these manifests target, and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", latest_version())


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def resources(kustomization: dict) -> list[dict]:
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())]


def by_kind(resources: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def test_committed_manifests_are_what_the_generator_writes():
    rendered = load_script(K8S / "generate.py").render()
    committed = {p.name: p.read_text() for p in K8S.glob("*.yaml")}
    assert rendered == committed, "run: python deploy/k8s/generate.py"


def test_kustomization_lists_every_manifest(kustomization: dict):
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    assert kustomization["kind"] == "Kustomization"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_resource_is_valid_against_the_kubernetes_schema(resources: list[dict], version: str):
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


def test_schema_validation_catches_a_wrong_field(resources: list[dict]):
    broken = json.loads(json.dumps(next(iter(by_kind(resources, "Deployment").values()))))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_a_deployment_service_and_autoscaler_per_mode(resources: list[dict]):
    deployments = by_kind(resources, "Deployment")
    services = by_kind(resources, "Service")
    autoscalers = by_kind(resources, "HorizontalPodAutoscaler")
    modes = {d["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] for d in deployments.values()}
    assert modes >= REQUIRED_DEPLOYED_MODES
    assert modes <= set(quant.list_modes())
    assert set(deployments) == set(services) == set(autoscalers)
    for name, deployment in deployments.items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert services[name]["spec"]["selector"].items() <= pod_labels.items()
        assert autoscalers[name]["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }


def test_probes_scrape_annotations_and_user_match_the_image(resources: list[dict]):
    port = int(assignments("ENV")["QS_PORT"])
    uid = int(arguments("USER")[-1].split(":")[0])
    for deployment in by_kind(resources, "Deployment").values():
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] == uid


def quantity_bytes(quantity: str) -> int:
    assert quantity.endswith("Mi"), quantity
    return int(quantity[:-2]) * 2**20


def test_memory_is_sized_from_the_measured_peak(resources: list[dict]):
    memory = json.loads((K8S / "memory.json").read_text())
    for deployment in by_kind(resources, "Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        peak = memory["modes"][env["QS_PRECISION"]]["peak_rss_bytes"]
        resources_ = container["resources"]
        request, limit = (quantity_bytes(resources_[k]["memory"]) for k in ("requests", "limits"))
        assert peak < request < limit < 2 * peak + 2**28, env["QS_PRECISION"]
        assert resources_["requests"]["cpu"] == env["OMP_NUM_THREADS"]
        # Sized for the load it admits: the concurrency the peak was measured under.
        assert env["QS_MAX_CONCURRENT_REQUESTS"] == str(memory["load"]["concurrency"])


def test_pods_stop_by_draining_within_the_grace_period(resources: list[dict]):
    """preStop sleeps while the pod leaves the Service's endpoints; SIGTERM then drains for
    QS_SHUTDOWN_TIMEOUT, uvicorn writes out open responses, and all that ends before the SIGKILL."""
    from app.main import RESPONSE_FLUSH_SECONDS
    from app.settings import Settings

    for deployment in by_kind(resources, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        shutdown_timeout = float(env.get("QS_SHUTDOWN_TIMEOUT", Settings.model_fields["shutdown_timeout"].default))
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop = float(command[1])
        assert 0 < pre_stop < shutdown_timeout
        assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown_timeout + RESPONSE_FLUSH_SECONDS
