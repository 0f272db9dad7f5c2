"""Streaming (/generate_stream and the OpenAI streams), client disconnects, 429 and timeouts.

Disconnect tests run a real uvicorn server on loopback: only a real socket
closing shows that a client that goes away frees its batch slot.
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from app.settings import load_settings
from tests.support.live_server import record_steps, serve_app, wait_idle

PROMPT = "The capital of France is"


def sse_data(lines) -> list[str]:
    return [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]


def stream_events(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(data) for data in sse_data(response.iter_lines()) if data != "[DONE]"]


def assert_error(response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    assert response.json().keys() == {"error", "error_type"}
    assert response.json()["error_type"] == error_type


def test_generate_stream_has_tgi_shape_and_matches_generate(client, tiny_model_dir):
    parameters = {"max_new_tokens": 9, "details": True, "repetition_penalty": 5.0}
    events = stream_events(client, "/generate_stream", {"inputs": PROMPT, "parameters": parameters})
    whole = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters}).json()
    assert [e["index"] for e in events] == list(range(len(events)))
    for event in events:
        assert event.keys() == {"index", "token", "top_tokens", "generated_text", "details"}
        assert event["token"].keys() == {"id", "text", "logprob", "special"}
        assert event["token"]["logprob"] <= 0
        assert event["top_tokens"] == []  # not asked
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    # decoded anew from the streamed ids by a tokenizer of our own, not the engine's detokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    decoded = tokenizer.decode([e["token"]["id"] for e in events], skip_special_tokens=True)
    assert last["generated_text"] == whole["generated_text"] == decoded
    assert "".join(e["token"]["text"] for e in events) == decoded
    assert last["details"] == {key: whole["details"].get(key) for key in last["details"]}
    assert whole["details"]["tokens"] == [e["token"] for e in events]
    assert whole["details"]["prefill"] == []  # decoder_input_details not asked
    assert last["details"]["generated_tokens"] == len(events)


def test_stream_details_only_when_asked_and_full_text(client):
    events = stream_events(
        client, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    )
    assert events[-1]["details"] is None
    assert events[-1]["generated_text"].startswith(PROMPT)


def test_sampled_stream_is_reproducible(client):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 11, "details": True}}
    first, second = (stream_events(client, "/generate_stream", body) for _ in range(2))
    assert [e["token"]["id"] for e in first] == [e["token"]["id"] for e in second]
    assert first[-1]["details"]["seed"] == 11


def test_errors_before_the_stream_starts_are_http_statuses(make_client):
    with make_client(api_key="k") as client:
        assert_error(client.post("/generate_stream", json={"inputs": PROMPT}), 401, "unauthorized")
        auth = {"Authorization": "Bearer k"}
        empty = client.post("/generate_stream", json={"inputs": ""}, headers=auth)
        assert_error(empty, 422, "validation")
        too_long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 500}}
        assert_error(client.post("/generate_stream", json=too_long, headers=auth), 422, "validation")
        chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2}
        assert_error(client.post("/v1/chat/completions", json=chat, headers=auth), 422, "validation")


def test_timeout_mid_stream_is_an_error_event_and_504_otherwise(make_client, monkeypatch):
    record_steps(monkeypatch, step_seconds=0.02)
    with make_client(request_timeout=1.0, max_total_tokens=512) as client:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400}}
        events = stream_events(client, "/generate_stream", body)
        assert "token" in events[0]
        assert events[-1] == {"error": events[-1]["error"], "error_type": "timeout"}
        assert len(events) < 400
        assert_error(client.post("/generate", json=body), 504, "timeout")
        body = {"prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
        chunks = stream_events(client, "/v1/completions", body)
        assert chunks[-1]["error_type"] == "timeout"


@pytest.fixture
def live(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    """`with live(**settings) as (url, app, recorder)`: a real server whose decode steps take 20 ms."""
    recorders = record_steps(monkeypatch, step_seconds=0.02)

    @contextmanager
    def start(**overrides):
        values = {
            "model": str(tiny_model_dir),
            "device": "cpu",
            "cache_dir": tmp_path,
            "max_input_tokens": 64,
            "max_total_tokens": 512,
            "max_batch_size": 1,
            **overrides,
        }
        with serve_app(load_settings(**values)) as (url, app):
            yield url, app, recorders[-1]

    return start


LONG = 400  # tokens a request would generate if nobody stopped it: 8 s at 20 ms a step
# (greedy on PROMPT never meets EOS on the tiny model; the OpenAI routes sample by default, so they ignore it)
OPENAI_LONG = {"max_tokens": LONG, "ignore_eos": True, "stream": True}
STREAMED = {
    "tgi": ("/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": LONG}}),
    "completions": ("/v1/completions", {"prompt": PROMPT, **OPENAI_LONG}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], **OPENAI_LONG}),
}


def assert_slot_freed(url: str, app, recorder, steps_before: int) -> None:
    """The cancelled request left the engine long before its end, and the one slot serves the next request."""
    assert wait_idle(app) == (0, 0)
    cancelled_steps = len(recorder.slots("decode")) - steps_before
    assert cancelled_steps < LONG // 4, f"{cancelled_steps} decode steps ran"
    follow_up = httpx.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert follow_up.status_code == 200


@pytest.mark.parametrize("api", sorted(STREAMED))
def test_disconnect_mid_stream_cancels_and_frees_the_slot(live, api):
    path, body = STREAMED[api]
    with live() as (url, app, recorder), httpx.Client(base_url=url, timeout=30) as client:
        steps_before = len(recorder.slots("decode"))
        with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            received = 0
            for line in response.iter_lines():
                received += line.startswith("data:")
                if received == 3:
                    break  # leaving the block closes the connection
        assert_slot_freed(url, app, recorder, steps_before)


NOT_STREAMED = {
    "tgi": ("/generate", STREAMED["tgi"][1]),
    "completions": ("/v1/completions", {**STREAMED["completions"][1], "stream": False}),
    "chat": ("/v1/chat/completions", {**STREAMED["chat"][1], "stream": False}),
}


@pytest.mark.parametrize("api", sorted(NOT_STREAMED))
def test_disconnect_before_the_answer_cancels_and_frees_the_slot(live, api):
    path, body = NOT_STREAMED[api]
    with live() as (url, app, recorder):
        steps_before = len(recorder.slots("decode"))
        recorder.gate.clear()  # no answer can come before the client gives up, however fast the machine
        try:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                httpx.post(f"{url}{path}", json=body, timeout=httpx.Timeout(30, read=0.5))
        finally:
            recorder.gate.set()
        assert_slot_freed(url, app, recorder, steps_before)


def test_full_queue_is_429_at_once(live):
    # One slot and one waiting place: the third concurrent request is refused, without waiting.
    with live(max_concurrent_requests=4, max_queue=1) as (url, app, recorder), httpx.Client(base_url=url) as client:
        recorder.gate.clear()  # hold the decode steps: the first request stays in its slot
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 50}}
        with client.stream("POST", "/generate_stream", json=body) as running:
            with client.stream("POST", "/generate_stream", json=body) as waiting:
                assert running.status_code == waiting.status_code == 200
                deadline = time.monotonic() + 10
                while app.state.service.engine.stats() != (1, 1) and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert app.state.service.engine.stats() == (1, 1)
                # answered while the others are held: it did not wait for a place
                refused = client.post("/generate", json=body, timeout=30)
                assert_error(refused, 429, "overloaded")
                assert refused.headers["retry-after"] == "1"
                recorder.gate.set()
                tail = sse_data(waiting.iter_lines())
            assert json.loads(tail[-1])["details"] is None and json.loads(tail[-1])["generated_text"] is not None
        assert wait_idle(app) == (0, 0)
        metrics = client.get("/metrics").text.splitlines()
        assert any('status="429"' in line and 'error_type="overloaded"' in line for line in metrics)


STALLED_TOKENS = 3000  # far more events than the shrunk socket buffers hold


def test_client_that_reads_nothing_never_holds_up_the_batch_and_is_cancelled(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
):
    """A real socket with a small receive buffer that never reads: its TCP window fills, the server's
    send blocks; the other sequence of the batch completes meanwhile, and the stalled one is cancelled
    after QS_STREAM_STALL_TIMEOUT, long before its max_tokens."""
    recorders = record_steps(monkeypatch, step_seconds=0.005)
    settings = load_settings(
        model=str(tiny_model_dir),
        device="cpu",
        cache_dir=tmp_path,
        max_input_tokens=64,
        max_total_tokens=4096,  # the lean runner's rotary table and cache reach past the config's 512
        max_batch_size=2,
        stream_stall_timeout=1.0,
    )
    # 4 KiB server send buffers: the stall comes after tens of kilobytes of events, not megabytes
    with serve_app(settings, send_buffer_bytes=4096) as (url, app):
        recorder, engine = recorders[-1], app.state.service.engine
        host, port = url.removeprefix("http://").split(":")
        stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        payload = json.dumps(
            {"prompt": PROMPT, "max_tokens": STALLED_TOKENS, "ignore_eos": True, "temperature": 0, "stream": True}
        ).encode()
        stalled.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        try:
            deadline = time.monotonic() + 30
            while engine.stats() != (1, 0):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            stalled_slot = recorder.slots("prefill")[-1][0]
            other = httpx.post(
                f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 20}}, timeout=60
            )
            assert other.status_code == 200 and other.json()["generated_text"]
            # the other request's steps ran with the stalled sequence in the batch
            both = [slots for slots in recorder.slots("decode") if stalled_slot in slots and len(slots) == 2]
            assert len(both) >= 19
            assert wait_idle(app, timeout=120) == (0, 0)
        finally:
            stalled.close()
    stalled_steps = sum(stalled_slot in slots for slots in recorder.slots("decode"))
    assert stalled_steps < STALLED_TOKENS - 1, "the stalled sequence ran to its end"
    assert "read nothing for 1 s (QS_STREAM_STALL_TIMEOUT)" in caplog.text
