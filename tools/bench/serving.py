"""Serving figures: start the real `quantserve` process for one mode (or `llama-server` for a peer file) and
drive it with our load generator: one stream, then concurrent streams."""

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

from tools.bench.llamacpp import LlamaCpp


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


def _wait_ready(process: subprocess.Popen, base_url: str, startup_timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"server exited with code {process.returncode}: {_last_line(log_path)}")
        status, body = _health(base_url)
        if status == 200:
            return
        if body.get("status") == "failed":
            raise ServerError(f"server failed to load: {body.get('detail')}")
        time.sleep(0.5)
    raise ServerError(f"server not ready after {startup_timeout:.0f} s")


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
def _running(
    command: list[str], env: dict[str, str], base_url: str, startup_timeout: float, log_path: Path
) -> Iterator[str]:
    """Run `command` with its output in `log_path` until it answers /health with 200; stop it on exit."""
    with log_path.open("wb") as log:
        try:
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        except OSError as error:
            raise ServerError(f"server did not start: {error}") from None
        try:
            _wait_ready(process, base_url, startup_timeout, log_path)
            yield base_url
        finally:
            stop_process(process)


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
    with _running([sys.executable, "-m", "app.main"], env, base_url, spec.startup_timeout, log_path):
        yield base_url


@contextmanager
def running_llama_server(
    peer: LlamaCpp,
    gguf: Path,
    *,
    slots: int,
    threads: int,
    context: int,
    log_path: Path,
    startup_timeout: float = 600.0,
) -> Iterator[str]:
    """Run `llama-server -np slots` on `gguf` on a free loopback port; yield its base URL (OpenAI routes)."""
    port = free_port()
    command = peer.server_command(gguf, slots=slots, threads=threads, context=context, port=port)
    base_url = f"http://127.0.0.1:{port}"
    with _running(command, dict(os.environ), base_url, startup_timeout, log_path):
        yield base_url


def _seconds(value: float) -> float | None:
    return None if math.isnan(value) else value  # NaN: no sample (e.g. one-token requests have no TPOT)


def measure_serving(base_url: str, concurrency: int, max_new_tokens: int, requests_per_client: int) -> dict[str, Any]:
    """One streaming client, then `concurrency` at once, against the server, as BenchRow fields (the load
    generator's figures; the same for our server and llama-server)."""
    from tools.loadgen import run_sweep

    counts = (1,) if concurrency == 1 else (1, concurrency)
    loads = run_sweep(base_url, counts, max_new_tokens=max_new_tokens, requests_per_client=requests_per_client)
    for load in loads:
        if load.failed:
            raise ServerError(
                f"{load.failed} of {load.failed + load.requests} streamed requests failed with {load.clients} client(s)"
            )
    single, load = loads[0], loads[-1]
    return {
        "single_stream_tok_s": single.tokens_per_second,
        "single_stream_ttft_p50_s": _seconds(single.ttft_p50),
        "single_stream_tpot_p50_s": _seconds(single.tpot_p50),
        "serve_concurrency": load.clients,
        "serve_requests": load.requests,
        "serve_generated_tokens": load.generated_tokens,
        "serve_tok_s": load.tokens_per_second,
        "ttft_p50_s": _seconds(load.ttft_p50),
        "ttft_p95_s": _seconds(load.ttft_p95),
        "tpot_p50_s": _seconds(load.tpot_p50),
        "tpot_p95_s": _seconds(load.tpot_p95),
    }
