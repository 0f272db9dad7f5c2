"""Kubernetes manifests, one Deployment + Service + HorizontalPodAutoscaler per precision mode.

Written as code so the modes cannot drift apart; the output is plain YAML that
`kubectl apply -k deploy/k8s` (kustomize) takes as it is. Memory requests and
limits come from `memory.json` (written by `measure_memory.py`).

    python deploy/k8s/generate.py            # rewrite the manifests
    python deploy/k8s/generate.py --check    # exit 1 if the committed manifests are stale
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

import quant

HERE = Path(__file__).parent


def deployed_modes(names: set[str]) -> tuple[str, ...]:
    """`names` in the registry's order; an unknown name fails here, with the accepted ones."""
    for name in names:
        quant.get_mode(name)
    return tuple(mode for mode in quant.list_modes() if mode in names)


# Which modes get a Deployment is a choice of this deployment, not an attribute of the modes:
# the reference and one mode per weight format (int8, int4, NormalFloat4). measure_memory.py
# measures these by default.
MODES = deployed_modes({quant.REFERENCE_MODE, "int8", "int4", "nf4"})
IMAGE = "quantserve:cpu"
PORT = 8000
UID = 10001  # the Dockerfile's USER
CPUS = 2
MEMORY_REQUEST_HEADROOM = 1.25  # over the measured peak
MEMORY_LIMIT_HEADROOM = 1.5
MEMORY_STEP = 64 * 2**20
# Stopping a pod: preStop sleeps while the endpoint controller takes the pod out of the Service, then
# SIGTERM starts the drain (QS_SHUTDOWN_TIMEOUT), then uvicorn writes out open responses (app.main's
# RESPONSE_FLUSH_SECONDS); the grace period covers all three, with a margin, before the SIGKILL.
PRE_STOP_SLEEP_SECONDS = 5
SHUTDOWN_TIMEOUT_SECONDS = 30
RESPONSE_FLUSH_SECONDS = 5
TERMINATION_GRACE_SECONDS = PRE_STOP_SLEEP_SECONDS + SHUTDOWN_TIMEOUT_SECONDS + RESPONSE_FLUSH_SECONDS + 5
COMMON_LABELS = {"app.kubernetes.io/name": "quantserve", "app.kubernetes.io/part-of": "quantserve"}


def mebibytes(value: float) -> str:
    """Round up to a multiple of MEMORY_STEP, as a Kubernetes quantity."""
    return f"{math.ceil(value / MEMORY_STEP) * MEMORY_STEP // 2**20}Mi"


def memory_resources(mode: str, measured: dict[str, Any]) -> tuple[dict[str, str], str]:
    """(request and limit, where the figure comes from). Every mode must be measured: a
    quantized mode is not bounded by fp32, as loading quantizes a float copy first."""
    if mode not in measured["modes"]:
        raise SystemExit(f"{mode} is not in memory.json: run python deploy/k8s/measure_memory.py --modes {mode} ...")
    peak = measured["modes"][mode]["peak_rss_bytes"]
    note = f"peak RSS measured by: {measured['command']}"
    return {
        "request": mebibytes(peak * MEMORY_REQUEST_HEADROOM),
        "limit": mebibytes(peak * MEMORY_LIMIT_HEADROOM),
    }, note


def http_probe(period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def deployment(mode: str, name: str, labels: dict[str, str], measured: dict[str, Any]) -> dict[str, Any]:
    memory, sized_from = memory_resources(mode, measured)
    container = {
        "name": "quantserve",
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {"name": "QS_PRECISION", "value": mode},
            {"name": "QS_DEVICE", "value": "cpu"},
            # The load the memory was measured under: more requests than this get 429 and the HPA scales out.
            {"name": "QS_MAX_CONCURRENT_REQUESTS", "value": str(measured["load"]["concurrency"])},
            {"name": "QS_SHUTDOWN_TIMEOUT", "value": str(SHUTDOWN_TIMEOUT_SECONDS)},
            # torch would otherwise start a thread per node core, not per core of this pod.
            {"name": "OMP_NUM_THREADS", "value": str(CPUS)},
        ],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        # /health is 503 while the model loads: the startup probe allows 5 minutes for it.
        "startupProbe": http_probe(period=5, failures=60),
        "readinessProbe": http_probe(period=5, failures=2),
        # The kubelet stops liveness probes once the pod is deleted, so the drain's 503 does not restart it.
        "livenessProbe": http_probe(period=10, failures=3),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_SLEEP_SECONDS)]}}},
        "resources": {
            "requests": {"cpu": str(CPUS), "memory": memory["request"]},
            # No CPU limit: throttling would show up as latency spikes; OMP_NUM_THREADS bounds the threads.
            "limits": {"memory": memory["limit"]},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels, "annotations": {"quantserve/memory-sized-from": sized_from}},
        "spec": {
            # No `replicas`: the HorizontalPodAutoscaler owns it (re-applying must not reset it).
            "selector": {"matchLabels": {"app.kubernetes.io/instance": name}},
            "template": {
                "metadata": {
                    "labels": dict(labels),  # a copy: YAML would write an anchor for a shared dict
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                },
            },
        },
    }


def service(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"app.kubernetes.io/instance": name},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def autoscaler(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": 1,
            "maxReplicas": 4,
            # CPU tracks decode load on a CPU node; a queue-length metric needs a metrics adapter.
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def mode_manifests(mode: str, measured: dict[str, Any]) -> list[dict[str, Any]]:
    name = f"quantserve-{mode}"
    labels = {**COMMON_LABELS, "app.kubernetes.io/instance": name, "quantserve/precision": mode}
    return [deployment(mode, name, labels, measured), service(name, labels), autoscaler(name, labels)]


def kustomization() -> dict[str, Any]:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"quantserve-{mode}.yaml" for mode in MODES],
        # `kustomize edit set image quantserve=registry/quantserve:tag` retargets every mode.
        "images": [{"name": "quantserve", "newName": "quantserve", "newTag": IMAGE.split(":")[1]}],
    }


def render() -> dict[str, str]:
    """File name -> YAML text."""
    measured = json.loads((HERE / "memory.json").read_text())
    header = "# Generated by deploy/k8s/generate.py: edit that file, not this one.\n"
    files = {
        f"quantserve-{mode}.yaml": header + yaml.safe_dump_all(mode_manifests(mode, measured), sort_keys=False)
        for mode in MODES
    }
    files["kustomization.yaml"] = header + yaml.safe_dump(kustomization(), sort_keys=False)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args()
    stale = []
    for name, text in render().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python deploy/k8s/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
