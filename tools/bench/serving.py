"""Serving figures: start the real `quantserve` process for one mode and drive it with concurrent streams."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ServerError(RuntimeError):
    """The server process did not become ready; the message says why."""


@dataclass(frozen=True)
class ServerSpec:
    mode: str
    model: str
    cache_dir: str
    device: str
    max_concurrent_requests: int
    startup_timeout: float = 600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(base_url: str) -> tuple[int | None, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:  # 503 while loading or after a failed load
        return error.code, json.loads(error.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, {}


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _wait_ready(process: subprocess.Popen, base_url: str, spec: ServerSpec, log_path: Path) -> None:
    deadline = time.monotonic() + spec.startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"server exited with code {process.returncode}: {_last_line(log_path)}")
        status, body = _health(base_url)
        if status == 200:
            return
        if body.get("status") == "failed":
            raise ServerError(f"server failed to load: {body.get('detail')}")
        time.sleep(0.5)
    raise ServerError(f"server not ready after {spec.startup_timeout:.0f} s")


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s; a process that already exited is left as it is."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def running_server(spec: ServerSpec, log_path: Path) -> Iterator[str]:
    """Run `quantserve` (app.main:main) for `spec.mode` on a free loopback port; yield its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "QS_MODEL": spec.model,
        "QS_PRECISION": spec.mode,
        "QS_DEVICE": spec.device,
        "QS_CACHE_DIR": spec.cache_dir,
        "QS_HOST": "127.0.0.1",
        "QS_PORT": str(port),
        "QS_MAX_CONCURRENT_REQUESTS": str(spec.max_concurrent_requests),
        "QS_LOG_LEVEL": "warning",
    }
    env.pop("QS_API_KEY", None)  # the load generator sends no key
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "app.main"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, base_url, spec, log_path)
            yield base_url
        finally:
            stop_process(process)


def measure_serving(base_url: str, concurrency: int, max_new_tokens: int, requests_per_client: int) -> dict[str, Any]:
    """`concurrency` streaming clients against the server, as BenchRow fields (the load generator's figures)."""
    from tools.loadgen import run_sweep

    (load,) = run_sweep(
        base_url, (concurrency,), max_new_tokens=max_new_tokens, requests_per_client=requests_per_client
    )
    if load.failed:
        raise ServerError(f"{load.failed} of {load.failed + load.requests} streamed requests failed")

    def seconds(value: float) -> float | None:
        return None if math.isnan(value) else value  # NaN: no sample (e.g. one-token requests have no TPOT)

    return {
        "serve_concurrency": load.clients,
        "serve_requests": load.requests,
        "serve_generated_tokens": load.generated_tokens,
        "serve_tok_s": load.tokens_per_second,
        "ttft_p50_s": seconds(load.ttft_p50),
        "ttft_p95_s": seconds(load.ttft_p95),
        "tpot_p50_s": seconds(load.tpot_p50),
        "tpot_p95_s": seconds(load.tpot_p95),
    }
