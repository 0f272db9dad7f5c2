"""Real HTTP servers on loopback for tests that need a socket (disconnects, the openai client).

`serve_app` runs uvicorn in a thread of the test process, so a test can look at
the service behind it; `serve_process` starts the `quantserve` console script.
Runners are instrumented by wrapping them (`StepRecorder`), never by changing the engine.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI

from app.engine.runner import ModelRunner
from app.main import create_app
from app.service import ModelService
from app.settings import Settings
from tests.support.env import clean_env
from tools.bench.serving import free_port

ROOT = Path(__file__).resolve().parents[2]
# The console script's entry point with each decode step slowed by argv[1] seconds. Inline, not a
# module of `tests`: importing that package drops the QS_* settings the child is started with.
SLOWED_MAIN = """
import sys, time
from app.main import main
from app.service import ModelService

make_runner, step_seconds = ModelService._make_runner, float(sys.argv[1])


class SlowSteps:
    def __init__(self, runner):
        self.runner = runner

    def prefill(self, slot, token_ids, all_positions=False):
        return self.runner.prefill(slot, token_ids, all_positions=all_positions)

    def decode(self, slots, token_ids):
        time.sleep(step_seconds)
        return self.runner.decode(slots, token_ids)

    def release(self, slot):
        self.runner.release(slot)


ModelService._make_runner = lambda self, loaded: SlowSteps(make_runner(self, loaded))
main()
"""


class StepRecorder:
    """Wraps a runner: logs its calls in order, and can slow down or hold each decode step."""

    def __init__(self, runner: ModelRunner, step_seconds: float = 0.0) -> None:
        self.runner = runner
        self.step_seconds = step_seconds
        self.calls: list[tuple[str, list[int]]] = []  # ("prefill" | "decode" | "release", slots)
        self.prefill_all_positions: list[bool] = []  # each prefill: were every position's logits asked?
        self.gate = threading.Event()
        self.gate.set()  # clear it to hold every decode step until it is set again

    def slots(self, kind: str) -> list[list[int]]:
        return [slots for name, slots in self.calls if name == kind]

    def prefill(self, slot: int, token_ids: list[int], all_positions: bool = False) -> torch.Tensor:
        self.calls.append(("prefill", [slot]))
        self.prefill_all_positions.append(all_positions)
        return self.runner.prefill(slot, token_ids, all_positions)

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        self.gate.wait()
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.calls.append(("decode", list(slots)))
        return self.runner.decode(slots, token_ids)

    def release(self, slot: int) -> None:
        self.calls.append(("release", [slot]))
        self.runner.release(slot)


def wait_ready(base_url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} not ready after {timeout:.0f} s")


@contextmanager
def serve_app(settings: Settings, send_buffer_bytes: int | None = None) -> Iterator[tuple[str, FastAPI]]:
    """Serve the app on a free loopback port in this process; yield (base URL, app).

    `send_buffer_bytes` sets SO_SNDBUF on the listening socket (accepted sockets inherit it), so a
    client that stops reading fills the server's buffers after kilobytes instead of megabytes.
    """
    app = create_app(settings, exit_on_load_failure=False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer_bytes is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="uvicorn", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url)
        yield base_url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def record_steps(monkeypatch, step_seconds: float = 0.0) -> list[StepRecorder]:
    """Make the next services wrap their runner in a `StepRecorder`; the list gets each one."""
    recorders: list[StepRecorder] = []
    original = ModelService._make_runner

    def recording_runner(self: ModelService, loaded) -> StepRecorder:
        recorders.append(StepRecorder(original(self, loaded), step_seconds))
        return recorders[-1]

    monkeypatch.setattr(ModelService, "_make_runner", recording_runner)
    return recorders


@contextmanager
def serve_process(
    env: dict[str, str], log_path: Path, step_seconds: float | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `python -m app.main` (the console script's entry point) on a free loopback port.

    It runs this checkout's code (cwd and PYTHONPATH), whatever the environment installed;
    with `step_seconds`, each decode step of its engine takes that much longer (`SLOWED_MAIN`).
    """
    port = free_port()
    full_env = clean_env(**{"QS_HOST": "127.0.0.1", "QS_PORT": str(port), "QS_LOG_LEVEL": "warning", **env})
    full_env["PYTHONPATH"] = str(ROOT)
    command = ["-m", "app.main"] if step_seconds is None else ["-c", SLOWED_MAIN, str(step_seconds)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *command], env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base_url, timeout=300, process=process)
            yield base_url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_idle(app: FastAPI, timeout: float = 10.0) -> tuple[int, int]:
    """Poll the engine until nothing runs or waits; return the last (running, waiting)."""
    engine = app.state.service.engine
    deadline = time.monotonic() + timeout
    stats = engine.stats()
    while stats != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
        stats = engine.stats()
    return stats
