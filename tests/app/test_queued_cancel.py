"""A request that waits for a batch slot and is cancelled (or its client leaves) frees its queue place,
and the model never runs for it.

The running request is held by the wrapped runner's gate (a threading.Event): every slot stays busy
for as long as the test needs, without timing assumptions.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from app.engine.engine import Engine, EngineOverloaded, Event, GenerationRequest
from app.engine.runner import ModelRunner, make_runner
from app.engine.sampling import SamplingParams
from app.model_loader import eos_token_ids, load_model
from app.settings import load_settings
from tests.support.live_server import StepRecorder, record_steps, serve_app, wait_idle

RUNNING = "The capital of France is"
QUEUED = "Exceptions are raised when"


class PromptLog:
    """Wraps a runner and keeps every prompt it prefills; `prefilled` is set at each prefill."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.prompts: list[list[int]] = []
        self.prefilled = threading.Event()

    def prefill(self, slot: int, token_ids: list[int], all_positions: bool = False) -> torch.Tensor:
        self.prompts.append(list(token_ids))
        logits = self.runner.prefill(slot, token_ids, all_positions)
        self.prefilled.set()
        return logits

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        return self.runner.decode(slots, token_ids)

    def release(self, slot: int) -> None:
        self.runner.release(slot)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_cancelled_while_queued_leaves_at_once_and_never_runs(tiny_model_dir: Path):
    loaded = load_model(load_settings(model=str(tiny_model_dir), device="cpu"))
    log = PromptLog(make_runner(loaded.model, loaded.device, 1, 128))
    recorder = StepRecorder(log)
    engine = Engine(recorder, loaded.tokenizer, eos_token_ids(loaded), loaded.device, max_batch_size=1, max_queue=1)
    ids = {text: loaded.tokenizer(text)["input_ids"] for text in (RUNNING, QUEUED)}
    running_done = threading.Event()
    running_events: list[Event] = []
    queued_events: list[Event] = []

    def on_running(event: Event) -> None:
        running_events.append(event)
        if getattr(event, "finish", None) is not None:
            running_done.set()

    recorder.gate.clear()  # the running request cannot finish: its first decode step waits here
    engine.start()
    try:
        engine.submit(GenerationRequest(ids[RUNNING], SamplingParams(max_new_tokens=5)), on_running)
        assert log.prefilled.wait(30)
        queued = GenerationRequest(ids[QUEUED], SamplingParams(max_new_tokens=5))
        engine.submit(queued, queued_events.append)
        assert engine.stats() == (1, 1)
        with pytest.raises(EngineOverloaded):  # the one waiting place is taken
            engine.submit(GenerationRequest(ids[QUEUED], SamplingParams(max_new_tokens=1)), queued_events.append)
        engine.cancel(queued)
        assert engine.stats() == (1, 0)  # freed at once, not at the next step
        # its place is free again: another request may wait there (and is cancelled in turn)
        again = GenerationRequest(ids[QUEUED], SamplingParams(max_new_tokens=1))
        engine.submit(again, queued_events.append)
        engine.cancel(again)
        recorder.gate.set()
        assert running_done.wait(30)
        wait_for(lambda: engine.stats() == (0, 0), "an idle engine")
    finally:
        recorder.gate.set()
        engine.stop()
    assert running_events[-1].finish.generated_tokens == 5
    assert queued_events == []  # no token, no error: nobody listens
    assert log.prompts == [ids[RUNNING]]  # the model never ran for the cancelled requests
    assert len(recorder.slots("prefill")) == 1


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """Send a request on a bare socket and read nothing: closing it is the client leaving."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + payload)
    return sock


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/completions"])
def test_client_leaving_while_queued_frees_its_place(tiny_model_dir: Path, tmp_path: Path, monkeypatch, path):
    recorders = record_steps(monkeypatch)
    settings = load_settings(
        model=str(tiny_model_dir),
        device="cpu",
        cache_dir=tmp_path,
        max_input_tokens=64,
        max_total_tokens=128,
        max_batch_size=1,
        max_concurrent_requests=2,  # one slot, one waiting place
    )
    running_body = {"inputs": RUNNING, "parameters": {"max_new_tokens": 20}}
    queued_body = (
        {"prompt": QUEUED, "max_tokens": 20, "ignore_eos": True}
        if path.startswith("/v1")
        else {"inputs": QUEUED, "parameters": {"max_new_tokens": 20}}
    )
    with serve_app(settings) as (url, app), httpx.Client(base_url=url, timeout=60) as client:
        recorder = recorders[-1]
        log = PromptLog(recorder.runner)
        recorder.runner = log  # also keep the prompts the model runs
        engine = app.state.service.engine
        queued_ids = app.state.service.loaded.tokenizer(QUEUED)["input_ids"]
        recorder.gate.clear()
        with client.stream("POST", "/generate_stream", json=running_body) as running:
            assert running.status_code == 200
            wait_for(lambda: engine.stats() == (1, 0), "the first request in its slot")
            leaving = raw_request(url, path, queued_body)
            wait_for(lambda: engine.stats() == (1, 1), "the second request waiting")
            leaving.close()
            wait_for(lambda: engine.stats() == (1, 0), "the queued request to leave")
            # its waiting place is free: a new request is queued, not refused with 429
            with client.stream("POST", "/generate_stream", json=running_body) as next_one:
                assert next_one.status_code == 200
                wait_for(lambda: engine.stats() == (1, 1), "the next request waiting")
                recorder.gate.set()
                assert '"generated_text"' in "".join(next_one.iter_lines())
            assert '"generated_text"' in "".join(running.iter_lines())
        assert wait_idle(app) == (0, 0)
        assert queued_ids not in log.prompts
        assert len(log.prompts) == 2  # the running request and the next one
