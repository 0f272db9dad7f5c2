"""An engine fault, seen from HTTP: every waiting and running request gets its error at once, /health
turns `failed`, the failure counter goes up, and nothing is served after it.

The fault is injected into the runner a real server (uvicorn on loopback) runs, through the
`StepRecorder` wrapper; its gate holds the running request so that another one waits behind it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from app.engine.engine import ENGINE_FAILED
from app.settings import load_settings
from tests.support.live_server import record_steps, serve_app, wait_idle

PROMPT = "The capital of France is"


def test_a_step_that_raises_fails_every_request_and_the_health_check(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    recorders = record_steps(monkeypatch)
    settings = load_settings(
        model=str(tiny_model_dir),
        device="cpu",
        cache_dir=tmp_path,
        max_input_tokens=64,
        max_total_tokens=256,
        max_batch_size=1,
        max_concurrent_requests=3,
    )
    with serve_app(settings) as (url, app), httpx.Client(base_url=url, timeout=30) as client:
        recorder, engine = recorders[-1], app.state.service.engine
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 100}}
        recorder.gate.clear()  # the first request stays in its slot, the second waits behind it
        results: dict[str, Any] = {}

        def stream() -> None:
            with client.stream("POST", "/generate_stream", json=body) as response:
                lines = [line for line in response.iter_lines() if line.startswith("data:")]
            results["stream"] = (response.status_code, [json.loads(line.removeprefix("data:")) for line in lines])

        def generate() -> None:
            results["generate"] = client.post("/generate", json=body)

        threads = [threading.Thread(target=stream), threading.Thread(target=generate)]
        threads[0].start()
        wait_for(lambda: engine.stats() == (1, 0))
        threads[1].start()
        wait_for(lambda: engine.stats() == (1, 1))

        def exploding_decode(slots: list[int], token_ids: list[int]) -> torch.Tensor:
            raise RuntimeError("kernel exploded")

        recorder.runner.decode = exploding_decode
        recorder.gate.set()
        for thread in threads:
            thread.join(30)
        status, events = results["stream"]
        assert status == 200 and "token" in events[0]  # its prefill had run
        assert events[-1] == {"error": ENGINE_FAILED, "error_type": "generation"}
        assert results["generate"].status_code == 500
        assert results["generate"].json() == {"error": ENGINE_FAILED, "error_type": "generation"}
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "failed", "detail": "engine failed: RuntimeError: kernel exploded"}
        metrics = client.get("/metrics").text
        assert any(
            line.startswith("qs_engine_failures_total{") and line.endswith(" 1.0") for line in metrics.splitlines()
        )
        assert wait_idle(app) == (0, 0)
        refused = client.post("/generate", json=body)
        assert refused.status_code == 503 and refused.json()["error_type"] == "unavailable"


def test_engine_failure_counter_is_exported_at_zero(client):
    lines = client.get("/metrics").text.splitlines()
    assert [line.endswith(" 0.0") for line in lines if line.startswith("qs_engine_failures_total{")] == [True]


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
