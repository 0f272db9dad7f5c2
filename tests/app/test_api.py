"""The HTTP contract of issue 3 on a tiny random Llama: shapes and every status code."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.model_loader import load_model
from tests.support.live_server import record_steps

PROMPT = "The capital of France is"


def generate(client, inputs=PROMPT, **parameters):
    return client.post("/generate", json={"inputs": inputs, "parameters": parameters})


def assert_error(response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == error_type
    assert "Traceback" not in body["error"]
    return body


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll until `condition()` holds; a generous bound, as the tests wait on a gate, not on timing."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_generate_returns_text_and_details(client):
    response = generate(client, max_new_tokens=5, details=True)
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["generated_text"], str)
    details = body["details"]
    assert details["finish_reason"] in {"length", "eos_token", "stop_sequence"}
    assert 1 <= details["generated_tokens"] <= 5
    assert details["prompt_tokens"] > 0


def test_details_only_when_asked(client):
    assert "details" not in generate(client, max_new_tokens=2).json()


def test_max_new_tokens_bounds_the_output(client):
    details = generate(client, max_new_tokens=7, details=True).json()["details"]
    assert details["generated_tokens"] == 7 or details["finish_reason"] == "eos_token"


def test_same_seed_same_text(client):
    params = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.3, "seed": 1234, "details": True}
    first = generate(client, **params).json()
    second = generate(client, **params).json()
    assert first["generated_text"] == second["generated_text"]
    assert first["details"]["seed"] == 1234


def test_different_seeds_differ(client):
    # A random tiny model samples nearly uniformly: 12 tokens coinciding for 3 seeds would be a bug.
    texts = {
        generate(client, max_new_tokens=12, do_sample=True, seed=seed).json()["generated_text"] for seed in (1, 2, 3)
    }
    assert len(texts) > 1


def test_greedy_is_deterministic(client):
    assert generate(client, max_new_tokens=8).json() == generate(client, max_new_tokens=8).json()


def test_return_full_text_prepends_prompt(client):
    plain = generate(client, max_new_tokens=4).json()["generated_text"]
    full = generate(client, max_new_tokens=4, return_full_text=True).json()["generated_text"]
    assert full == PROMPT + plain


def test_stop_sequence_ends_generation(client):
    free = generate(client, max_new_tokens=20).json()["generated_text"]
    if len(free) < 4:
        pytest.skip("tiny model produced too little text to pick a stop sequence")
    stop = free[2:4]
    body = generate(client, max_new_tokens=20, stop=[stop], details=True).json()
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert stop not in body["generated_text"]
    assert free.startswith(body["generated_text"])


@pytest.mark.parametrize(
    "payload",
    [
        {"inputs": ""},
        {"inputs": PROMPT, "unknown": 1},
        {"inputs": PROMPT, "parameters": {"unknown": 1}},
        {"inputs": 42},
        {"inputs": PROMPT, "parameters": {"max_new_tokens": "many"}},
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}},
        {"inputs": PROMPT, "parameters": {"temperature": -0.5}},
        {"inputs": PROMPT, "parameters": {"top_p": 0}},
        {"inputs": PROMPT, "parameters": {"top_p": 1.5}},
        {"parameters": {"max_new_tokens": 3}},
    ],
)
def test_invalid_requests_are_422(client, payload):
    assert_error(client.post("/generate", json=payload), 422, "validation")


def test_nan_temperature_is_422(client):
    body = '{"inputs": "hi", "parameters": {"temperature": NaN}}'
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, "validation")


def test_malformed_json_is_422(client):
    response = client.post("/generate", content="{not json", headers={"content-type": "application/json"})
    assert_error(response, 422, "validation")


def test_prompt_over_max_input_tokens_is_422(client):
    body = assert_error(generate(client, inputs="word " * 200, max_new_tokens=1), 422, "validation")
    assert "QS_MAX_INPUT_TOKENS" in body["error"]


def test_prompt_plus_new_tokens_over_total_is_422(client):
    body = assert_error(generate(client, max_new_tokens=127), 422, "validation")
    assert "QS_MAX_TOTAL_TOKENS" in body["error"]


def test_unknown_route_is_json_404(client):
    assert_error(client.get("/nope"), 404, "not_found")


def test_too_many_in_flight_is_429(make_client, monkeypatch):
    recorders = record_steps(monkeypatch)
    with make_client(max_concurrent_requests=1) as client, ThreadPoolExecutor(2) as pool:
        engine = client.app.state.service.engine
        recorders[-1].gate.clear()  # hold decoding: the first request keeps the only place until released
        try:
            first = pool.submit(generate, client, max_new_tokens=5)
            assert wait_for(lambda: engine.stats() == (1, 0)), engine.stats()
            # answered while the first is held: a request let in would wait for the gate, and time out here
            refused = pool.submit(generate, client, max_new_tokens=5).result(timeout=30)
        finally:
            recorders[-1].gate.set()
        assert_error(refused, 429, "overloaded")
        assert refused.headers["retry-after"] == "1"
        assert first.result(timeout=60).status_code == 200
        assert generate(client, max_new_tokens=1).status_code == 200  # the place is free again


def test_api_key_guards_generation_only(make_client):
    with make_client(api_key="s3cret") as client:
        assert_error(generate(client, max_new_tokens=1), 401, "unauthorized")
        wrong = client.post("/generate", json={"inputs": PROMPT}, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized")
        ok = client.post(
            "/generate",
            json={"inputs": PROMPT, "parameters": {"max_new_tokens": 1}},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/info").status_code == 200


def test_503_while_loading(make_client):
    release = threading.Event()

    def slow_loader(settings):
        release.wait(60)
        return load_model(settings)

    with make_client(loader=slow_loader, wait=False) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "loading"
        assert_error(generate(client, max_new_tokens=1), 503, "unavailable")
        release.set()
        assert client.app.state.service.wait_until_loaded(timeout=60)
        assert client.get("/health").status_code == 200


def test_failed_load_reports_503(make_client):
    def broken_loader(settings):
        raise RuntimeError("weights are corrupt")

    with make_client(loader=broken_loader) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "failed"
        assert "corrupt" in health.json()["detail"]


def assert_one_line_error_log(caplog, logger: str, *fragments: str) -> None:
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in records] == [logger], [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "\n" not in message and records[0].exc_info is None  # one line, no traceback
    assert all(fragment in message for fragment in fragments), message


def test_generation_failure_is_json_500_without_trace(client, caplog):
    model = client.app.state.service.loaded.model

    def explode(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    model.get_input_embeddings().forward = explode
    response = generate(client, max_new_tokens=2)
    body = assert_error(response, 500, "generation")
    assert "kernel exploded" not in body["error"] and "Traceback" not in response.text


def test_unexpected_route_error_is_json_500_without_trace(client, monkeypatch, caplog):
    # Not a ServiceError: it leaves the route and is caught by the `observe` middleware's except.
    def explode(*args, **kwargs):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(client.app.state.service, "tokenize", explode)
    with caplog.at_level(logging.ERROR):
        response = generate(client, max_new_tokens=2)
    body = assert_error(response, 500, "internal")
    assert "tokenizer exploded" not in response.text
    assert_one_line_error_log(caplog, "app", "POST /generate -> 500", "RuntimeError", "tokenizer exploded")
    lines = client.get("/metrics").text.splitlines()
    assert any('status="500"' in line and 'error_type="internal"' in line for line in lines)
    assert body["error"] == "internal server error"


def test_error_outside_the_middleware_try_is_json_500_from_the_catch_all(client, monkeypatch, caplog):
    # Raised by the middleware itself after the response (its metrics call): only the app-wide
    # Exception handler (app.errors) can answer.
    def explode(*args, **kwargs):
        raise RuntimeError("metrics exploded")

    monkeypatch.setattr(client.app.state.service.metrics, "observe_request", explode)
    with caplog.at_level(logging.ERROR):
        response = generate(client, max_new_tokens=1)
    body = assert_error(response, 500, "internal")
    assert "metrics exploded" not in response.text
    assert body["error"] == "internal server error"
    assert_one_line_error_log(caplog, "app.errors", "POST /generate -> 500", "RuntimeError", "metrics exploded")


def test_info_describes_the_loaded_model(client):
    info = client.get("/info").json()
    assert info["precision"] == "fp32"
    assert info["device"] == "cpu"
    assert info["compute_dtype"] == "float32"
    assert info["weight_bytes"] > 0
    assert info["backend"]
    assert info["limits"] == {
        "max_input_tokens": 64,
        "max_total_tokens": 128,
        "max_concurrent_requests": 16,
        "max_request_bytes": 2_000_000,
        "max_chars_per_token": client.app.state.service.max_chars_per_token,
    }
    assert info["version"]


def test_info_reports_int8_layers(make_client):
    with make_client(precision="int8") as client:
        info = client.get("/info").json()
    q = info["quantization"]
    assert info["precision"] == "int8"
    assert q["layers_quantized"] > 0
    # the tied lm_head becomes int8 g32 (QS_QUANTIZE_LM_HEAD=auto): nothing is left float
    assert q["layers_skipped"] == 0 and info["lm_head"] == "int8-g32 (shared with the embedding)"
    assert 0 < q["quantized_ratio"] < 0.35
    assert q["errors"]["mean_sqnr_db"] > 30


def test_metrics_are_labelled_by_precision(client):
    generate(client, max_new_tokens=2)
    generate(client, inputs="")
    text = client.get("/metrics").text
    assert "qs_requests_total{" in text
    lines = [line for line in text.splitlines() if line.startswith("qs_requests_total{")]
    assert any('route="/generate"' in line and 'status="200"' in line and 'precision="fp32"' in line for line in lines)
    assert any('status="422"' in line and 'error_type="validation"' in line for line in lines)
    assert "qs_request_duration_seconds_bucket" in text


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/generate" in schema["paths"]
    json.dumps(schema)
