"""Graceful drain of a real `quantserve` process on SIGTERM/SIGINT.

Only a real process shows it: the signal handlers, the port that stays open while /health
says `draining`, what a client sees of the requests that were running or queued, and the
exit status. Decode steps are slowed (`serve_process(step_seconds=...)`) so the requests are
still running when the signal comes, however fast the machine.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.live_server import serve_process

PROMPT = "The capital of France is"
STEP_SECONDS = 0.02


def server_env(tiny_model_dir: Path, cache_dir: Path, shutdown_timeout: float) -> dict[str, str]:
    return {
        "QS_MODEL": str(tiny_model_dir),
        "QS_DEVICE": "cpu",
        "QS_CACHE_DIR": str(cache_dir),  # the built kernels are reused
        "QS_MAX_INPUT_TOKENS": "64",
        "QS_MAX_TOTAL_TOKENS": "512",
        "QS_MAX_BATCH_SIZE": "1",  # one runs, the other waits
        "QS_MAX_CONCURRENT_REQUESTS": "4",
        "QS_SHUTDOWN_TIMEOUT": str(shutdown_timeout),
        "QS_LOG_LEVEL": "info",
    }


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    return thread, result


def stream_events(url: str, max_new_tokens: int) -> list[dict]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data:").strip() for line in response.iter_lines() if line.startswith("data:")]
    return [json.loads(line) for line in lines]


def generate(url: str, max_new_tokens: int) -> httpx.Response:
    return httpx.post(
        f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens}}, timeout=60
    )


def wait_for(url: str, running: int, waiting: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        scheduler = httpx.get(f"{url}/info", timeout=5).json()["scheduler"]
        if (scheduler["running"], scheduler["waiting"]) == (running, waiting):
            return
        time.sleep(0.02)
    raise AssertionError(f"never {running} running and {waiting} waiting")


def wait_exit(process, timeout: float = 60) -> int:
    return process.wait(timeout=timeout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_running_and_queued_requests_then_exits_0(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path, sig
):
    env = server_env(tiny_model_dir, cache_dir, shutdown_timeout=60)
    with serve_process(env, tmp_path / "server.log", step_seconds=STEP_SECONDS) as (url, process):
        streaming, streamed = in_thread(lambda: stream_events(url, 150))  # 3 s of decode steps
        wait_for(url, running=1, waiting=0)
        waiting, answered = in_thread(lambda: generate(url, 10))
        wait_for(url, running=1, waiting=1)
        process.send_signal(sig)
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{url}/health", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "the drain never began"
            time.sleep(0.01)
        # the port is still open: /health answers, and new generations are refused
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        refused = generate(url, 2)
        assert refused.status_code == 503, refused.text
        assert refused.json() == {"error": "the server is shutting down", "error_type": "unavailable"}
        streaming.join(60)
        waiting.join(60)
        exit_status = wait_exit(process)
    # what ran and what waited both finished in full
    events = streamed[0]
    assert len(events) == 150 and "error" not in events[-1] and events[-1]["generated_text"] is not None
    assert answered[0].status_code == 200, answered[0].text
    assert exit_status == 0
    log = (tmp_path / "server.log").read_text()
    assert f"{sig.name}: draining" in log and "Finished server process" in log


def test_requests_left_after_the_shutdown_timeout_end_with_an_error(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
):
    env = server_env(tiny_model_dir, cache_dir, shutdown_timeout=1)
    with serve_process(env, tmp_path / "server.log", step_seconds=STEP_SECONDS) as (url, process):
        streaming, streamed = in_thread(lambda: stream_events(url, 400))  # 8 s of decode steps
        wait_for(url, running=1, waiting=0)
        waiting, answered = in_thread(lambda: generate(url, 10))
        wait_for(url, running=1, waiting=1)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        streaming.join(60)
        waiting.join(60)
        exit_status = wait_exit(process)
        stopped_after = time.monotonic() - signalled
    events = streamed[0]
    assert "token" in events[0] and len(events) < 400
    assert events[-1] == {"error": "the server is shutting down", "error_type": "unavailable"}
    assert answered[0].status_code == 503
    assert answered[0].json() == {"error": "the server is shutting down", "error_type": "unavailable"}
    assert exit_status == 0
    assert stopped_after < 30  # well before the 8 s of decode steps the stream asked for, plus process exit
