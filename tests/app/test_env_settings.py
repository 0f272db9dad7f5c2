"""Every `QS_*` variable of the README's settings table, set as a user sets it: in the
environment of a real `quantserve` process, where every value arrives as a string.

A valid value must be taken (it shows in `/info` or in what the server does); an invalid
one must stop the process with one line naming the variable, and exit code 2.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from quant.kernels import native_ops
from tests.support.env import clean_env
from tests.support.live_server import serve_process

README = Path(__file__).resolve().parents[2] / "README.md"

# One value per variable that Settings must refuse, with a word its message must contain.
INVALID: dict[str, tuple[str, str]] = {
    "QS_MODEL": ("/no/such/model.gguf", "does not exist"),
    "QS_PRECISION": ("int3", "fp32"),
    "QS_MAX_MEMORY": ("lots", "could not parse"),
    "QS_SHADOW_REFERENCE": ("int3", "accepted"),
    "QS_SHADOW_SAMPLE": ("1.5", "less than or equal to 1"),
    "QS_DEVICE": ("tpu", "'cuda'"),
    "QS_HOST": ("bad host!", "not an IP address"),
    "QS_PORT": ("70000", "less than or equal to 65535"),
    "QS_MAX_INPUT_TOKENS": ("many", "valid integer"),
    "QS_MAX_TOTAL_TOKENS": ("1", "greater than or equal to 2"),
    "QS_MAX_CONCURRENT_REQUESTS": ("-4", "greater than or equal to 1"),
    "QS_MAX_BATCH_SIZE": ("0", "greater than or equal to 1"),
    "QS_MAX_QUEUE": ("-1", "greater than or equal to 0"),
    "QS_REQUEST_TIMEOUT": ("0", "greater than 0"),
    "QS_MAX_REQUEST_BYTES": ("0", "greater than or equal to 1"),
    "QS_SHUTDOWN_TIMEOUT": ("-1", "greater than or equal to 0"),
    "QS_STREAM_STALL_TIMEOUT": ("0", "greater than 0"),
    "QS_CACHE_DIR": (__file__, "not a directory"),
    "QS_API_KEY": ("", "non-empty"),
    "QS_GROUP_SIZE": ("48", "32, 64 or 128"),
    "QS_OUTLIER_THRESHOLD": ("-1", "greater than 0"),
    "QS_FP8_FORMAT": ("e3m4", "e4m3 or e5m2"),
    "QS_QUANTIZE_LM_HEAD": ("maybe", "auto, true or false"),
    "QS_SKIP_MODULES": ("lm head", "module name pattern"),
    "QS_CALIBRATION_FILE": ("/no/such/calibration.txt", "is not a file"),
    "QS_CALIBRATION_TOKENS": ("0", "greater than 0"),
    "QS_ACTIVATION_OBSERVER": ("max", "minmax, percentile or mse"),
    "QS_SMOOTHQUANT_ALPHA": ("2", "auto or between 0 and 1"),
    "QS_DYNAMIC_ACTIVATION_MODULES": ("down proj", "module name pattern"),
    "QS_LOG_LEVEL": ("verbose", "'debug'"),
    "QS_KERNELS": ("fast", "'reference'"),
    "QS_KERNEL_ISA": ("neon", "'avx2'"),
}


def readme_variables() -> set[str]:
    """The variables the README's settings table documents (`QS_HOST` / `QS_PORT` share a row)."""
    section = README.read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `QS_")]
    return {name for row in rows for name in re.findall(r"`(QS_[A-Z0-9_]+)`", row.split("|")[1])}


def test_every_documented_variable_is_covered() -> None:
    documented = readme_variables()
    assert len(documented) >= 20, documented
    assert documented == set(INVALID) | {"QS_HOST", "QS_PORT"}
    assert documented <= set(INVALID) | VALID_IN_PROCESS


def run_quantserve(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.main"], env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def invalid_runs() -> dict[str, subprocess.CompletedProcess]:
    """All the refused starts, run two at a time (each exits before loading anything)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = pool.map(lambda item: (item[0], run_quantserve({item[0]: item[1][0]})), INVALID.items())
        return dict(runs)


@pytest.mark.parametrize("variable", sorted(INVALID))
def test_invalid_value_exits_2_with_one_line(invalid_runs: dict[str, subprocess.CompletedProcess], variable: str):
    result = invalid_runs[variable]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"quantserve: invalid {variable}:"), lines[0]
    assert INVALID[variable][1] in lines[0], lines[0]


# --- valid values, in three served processes -----------------------------------------

# Each is asserted in one of the tests below; the set keeps the README check honest.
VALID_IN_PROCESS = {
    "QS_MODEL",
    "QS_PRECISION",
    "QS_MAX_MEMORY",
    "QS_SHADOW_REFERENCE",
    "QS_SHADOW_SAMPLE",
    "QS_DEVICE",
    "QS_HOST",
    "QS_PORT",
    "QS_MAX_INPUT_TOKENS",
    "QS_MAX_TOTAL_TOKENS",
    "QS_MAX_CONCURRENT_REQUESTS",
    "QS_MAX_BATCH_SIZE",
    "QS_MAX_QUEUE",
    "QS_REQUEST_TIMEOUT",
    "QS_MAX_REQUEST_BYTES",
    "QS_SHUTDOWN_TIMEOUT",
    "QS_STREAM_STALL_TIMEOUT",
    "QS_CACHE_DIR",
    "QS_API_KEY",
    "QS_GROUP_SIZE",
    "QS_OUTLIER_THRESHOLD",
    "QS_FP8_FORMAT",
    "QS_QUANTIZE_LM_HEAD",
    "QS_SKIP_MODULES",
    "QS_DYNAMIC_ACTIVATION_MODULES",
    "QS_CALIBRATION_FILE",
    "QS_CALIBRATION_TOKENS",
    "QS_ACTIVATION_OBSERVER",
    "QS_SMOOTHQUANT_ALPHA",
    "QS_LOG_LEVEL",
    "QS_KERNELS",
    "QS_KERNEL_ISA",
}

TINY_LINEARS = 2 * 7  # the tiny Llama: 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def int4_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("int4-server") / "server.log"
    env = {
        "QS_MODEL": str(tiny_model_dir),
        "QS_PRECISION": "int4",
        "QS_GROUP_SIZE": "32",
        "QS_DEVICE": "cpu",
        "QS_MAX_INPUT_TOKENS": "40",
        "QS_MAX_TOTAL_TOKENS": "60",
        "QS_MAX_CONCURRENT_REQUESTS": "5",
        "QS_MAX_BATCH_SIZE": "3",
        "QS_MAX_QUEUE": "1",
        "QS_REQUEST_TIMEOUT": "45.5",
        "QS_MAX_REQUEST_BYTES": "50000",
        "QS_STREAM_STALL_TIMEOUT": "12.5",
        "QS_SHUTDOWN_TIMEOUT": "7",  # the drain itself: tests/app/test_drain.py
        "QS_API_KEY": "s3cret",
        "QS_SKIP_MODULES": "*.down_proj",
        "QS_QUANTIZE_LM_HEAD": "false",
        "QS_KERNEL_ISA": "avx2",
        "QS_LOG_LEVEL": "debug",
    }
    with serve_process(env, log) as (base_url, _process):
        yield base_url, log


def test_int4_process_takes_its_settings(int4_server: tuple[str, Path], tiny_model_dir: Path) -> None:
    base_url, _ = int4_server  # QS_HOST=127.0.0.1 and QS_PORT: serve_process sets them; it answers there
    info = httpx.get(f"{base_url}/info").json()
    assert info["model_id"].endswith(tiny_model_dir.name)
    assert info["precision"] == "int4" and info["device"] == "cpu"
    assert info["quantization"]["group_size"] == 32 and info["options"]["group_size"] == 32
    assert info["limits"] == {
        "max_input_tokens": 40,
        "max_total_tokens": 60,
        "max_concurrent_requests": 5,
        "max_request_bytes": 50000,
        "max_chars_per_token": info["limits"]["max_chars_per_token"],
    }
    assert info["scheduler"]["max_batch_size"] == 3
    assert info["scheduler"]["max_queue"] == 1
    assert info["scheduler"]["request_timeout"] == 45.5
    assert info["scheduler"]["stream_stall_timeout"] == 12.5
    assert info["scheduler"]["shutdown_timeout"] == 7
    # QS_SKIP_MODULES: both down projections stay float, with the tied head (QS_QUANTIZE_LM_HEAD=false)
    assert info["lm_head"] == "float" and info["options"]["quantize_lm_head"] == "false"
    assert info["quantization"]["layers_quantized"] == TINY_LINEARS - 2
    assert info["quantization"]["layers_skipped"] == 2 + 1
    assert info["options"]["kernel_isa"] == "avx2"
    ops = native_ops()
    if ops is not None and "avx2" in ops.available_isas():
        assert set(info["kernels"]) == {"quantserve-avx2"}, info["kernels"]


def test_int4_process_enforces_key_and_limits(int4_server: tuple[str, Path]) -> None:
    base_url, log = int4_server
    body: dict[str, Any] = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    assert httpx.post(f"{base_url}/generate", json=body).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.post(f"{base_url}/generate", json=body, headers=auth).status_code == 200
    long_prompt = {"inputs": "word " * 200, "parameters": {"max_new_tokens": 2}}
    refused = httpx.post(f"{base_url}/generate", json=long_prompt, headers=auth)
    assert refused.status_code == 422 and "40" in refused.json()["error"]
    over_total = {"inputs": "Hello", "parameters": {"max_new_tokens": 59}}
    assert httpx.post(f"{base_url}/generate", json=over_total, headers=auth).status_code == 422
    over_bytes = {"inputs": "x" * 50000}  # QS_MAX_REQUEST_BYTES
    assert httpx.post(f"{base_url}/generate", json=over_bytes, headers=auth).status_code == 413
    assert re.search(r" DEBUG app\.service: generation finished", log.read_text())  # QS_LOG_LEVEL=debug


def test_fp8_process_takes_format_head_and_threshold(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {
        "QS_MODEL": str(tiny_model_dir),
        "QS_PRECISION": "fp8",
        "QS_FP8_FORMAT": "e5m2",
        "QS_QUANTIZE_LM_HEAD": "true",
        "QS_OUTLIER_THRESHOLD": "3.5",
    }
    with serve_process(env, tmp_path / "server.log") as (base_url, _):
        info = httpx.get(f"{base_url}/info").json()
    assert info["options"]["fp8_format"] == "e5m2" and info["options"]["outlier_threshold"] == 3.5
    assert info["quantization"]["layers_quantized"] == TINY_LINEARS + 1  # the head too
    # e5m2 keeps 2 mantissa bits to e4m3's 3: about twice the error (measured on this model: 0.050 vs 0.025)
    assert info["quantization"]["errors"]["mean_relative_error"] > 0.04


def test_int8_static_process_takes_its_calibration_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    text = tmp_path / "calibration.txt"
    text.write_text(topics["assert"] + topics["if"] + topics["for"] + topics["while"])
    env = {
        "QS_MODEL": str(tiny_model_dir),
        "QS_PRECISION": "int8-static",
        "QS_CALIBRATION_FILE": str(text),
        "QS_CALIBRATION_TOKENS": "300",
        "QS_ACTIVATION_OBSERVER": "percentile",
        "QS_SMOOTHQUANT_ALPHA": "0.25",
        "QS_DYNAMIC_ACTIVATION_MODULES": "o_proj, down_proj",
        "QS_CACHE_DIR": str(tmp_path / "cache"),
    }
    with serve_process(env, tmp_path / "server.log") as (base_url, _):
        info = httpx.get(f"{base_url}/info").json()
    options = info["options"]
    assert options["activation_observer"] == "percentile" and options["smoothquant_alpha"] == "0.25"
    assert options["dynamic_activation_modules"] == ["o_proj", "down_proj"]
    calibration = info["quantization"]["calibration"]
    assert calibration["source"] == str(text.resolve()) and calibration["tokens"] == 300
    assert not calibration["cached"] and calibration["seconds"] > 0
    assert "model.layers.0.self_attn.o_proj" in calibration["details"]["dynamic_layers"]


def test_multi_mode_process_takes_its_modes_memory_and_shadow(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {
        "QS_MODEL": str(tiny_model_dir),
        "QS_PRECISION": "int8,fp32",
        "QS_MAX_MEMORY": "4GiB",
        "QS_SHADOW_REFERENCE": "fp32",
        "QS_SHADOW_SAMPLE": "1",
        "QS_MAX_TOTAL_TOKENS": "64",
        "QS_MAX_INPUT_TOKENS": "32",
    }
    with serve_process(env, tmp_path / "server.log") as (base_url, _):
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "precision": "int8"}}
        assert httpx.post(f"{base_url}/generate", json=body).status_code == 200
        deadline = time.monotonic() + 30
        while (info := httpx.get(f"{base_url}/info").json())["shadow"]["scored"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert [m["precision"] for m in info["modes"]] == ["int8", "fp32"] and info["precision"] == "int8"
    assert info["memory"]["max_memory"] == 4 * 1024**3
    assert info["shadow"] == {"reference": "fp32", "sample": 1.0, "scored": 1, "failed": 0, "dropped": 0, "pending": 0}


@pytest.mark.real_model
def test_default_model_int4_g32_is_exact_and_json_safe(tmp_path: Path) -> None:
    """On the default model, int4 at group 32 lands on the GGUF's own 4-bit grid and the int8 g32
    head on its Q8_0 token_embd: every layer is reproduced exactly, and /info must still answer
    valid JSON (no Infinity)."""
    cache = tmp_path / "cache"
    env = {"QS_PRECISION": "int4", "QS_GROUP_SIZE": "32", "QS_CACHE_DIR": str(cache), "QS_KERNELS": "reference"}
    with serve_process(env, tmp_path / "server.log") as (base_url, _):
        response = httpx.get(f"{base_url}/info")
        assert response.status_code == 200
        info = response.json()  # strict JSON: the parser would refuse Infinity only if we let it through
        generated = httpx.post(
            f"{base_url}/generate", json={"inputs": "Paris is", "parameters": {"max_new_tokens": 3}}, timeout=120
        )
    assert "Infinity" not in response.text
    errors = info["quantization"]["errors"]
    assert errors["exact"] is True and errors["mean_sqnr_db"] is None
    assert errors["exact_layers"] == info["quantization"]["layers_quantized"] == 30 * 7 + 1  # + the head
    assert info["lm_head"] == "int8-g32 (shared with the embedding)"  # QS_QUANTIZE_LM_HEAD=auto
    assert info["kernels"] == {"reference": 30 * 7 + 1}  # QS_KERNELS=reference
    assert info["runner"] == "lean"  # the native decode step needs the kernels
    assert generated.status_code == 200
    assert list(cache.glob("**/config.json")), list(cache.iterdir())  # QS_CACHE_DIR holds the converted model
