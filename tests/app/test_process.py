"""The real process: bad settings stop it before loading; a good start serves HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.env import clean_env
from tools.bench.serving import free_port


def run_quantserve(env_overrides: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = clean_env(**env_overrides)
    return subprocess.run(
        [sys.executable, "-m", "app.main"], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize(
    ("env", "variable", "accepted"),
    [
        ({"QS_PRECISION": "int3"}, "QS_PRECISION", "fp32"),
        ({"QS_MAX_CONCURRENT_REQUESTS": "-4"}, "QS_MAX_CONCURRENT_REQUESTS", "greater than or equal to 1"),
        ({"QS_MODEL": "/no/such/model.gguf"}, "QS_MODEL", "does not exist"),
        ({"QS_DEVICE": "tpu"}, "QS_DEVICE", "'auto', 'cpu' or 'cuda'"),
    ],
)
def test_invalid_setting_exits_before_loading(env, variable, accepted):
    started = time.perf_counter()
    result = run_quantserve(env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and accepted in lines[0]
    assert "Traceback" not in result.stderr
    assert time.perf_counter() - started < 30  # no model was loaded


def test_console_script_serves_and_stops(tiny_model_dir: Path, tmp_path: Path):
    port = free_port()
    env = clean_env(
        QS_MODEL=str(tiny_model_dir),
        QS_PRECISION="int8",
        QS_HOST="127.0.0.1",
        QS_PORT=str(port),
        QS_CACHE_DIR=str(tmp_path),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.main"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{base}/health", timeout=2).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.3)
        assert status == 200
        response = httpx.post(f"{base}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
        assert response.status_code == 200
        assert httpx.get(f"{base}/info").json()["precision"] == "int8"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # an idle server drains at once and exits 0 (uvicorn alone would re-raise the SIGTERM: status -15)
    assert proc.returncode == 0, out.decode()
    assert b"Finished server process" in out


def test_failed_model_load_exits_non_zero(tmp_path: Path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = run_quantserve({"QS_MODEL": str(empty), "QS_PORT": str(free_port()), "QS_HOST": "127.0.0.1"}, timeout=120)
    assert result.returncode == 1
    assert "model load failed" in result.stderr
