"""The service on a CUDA device: run where one is lent (CI has none, so these skip there).

Every family of modes loads and serves the tiny model on the GPU through the HTTP API, on the
lean torch runner (the native decode step is CPU-only), and /metrics carries the CUDA memory
series. fp32 on the GPU must greedily write what fp32 on the CPU writes.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.modes import ALL_MODES

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "do_sample": False}}


def greedy_text(client) -> str:
    response = client.post("/generate", json=GREEDY)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_mode_serves_on_cuda(make_client, mode: str) -> None:
    with make_client(device="cuda", precision=mode) as client:
        info = client.get("/info").json()
        assert info["device"].startswith("cuda"), info
        assert info["runner"] in ("lean", "transformers"), info
        first = greedy_text(client)
        assert first and greedy_text(client) == first  # greedy is deterministic on the GPU too
        metrics = client.get("/metrics").text
        cuda_series = [line for line in metrics.splitlines() if line.startswith("qs_cuda_memory_allocated_bytes{")]
        assert cuda_series and 'device="cuda' in cuda_series[0], cuda_series


def test_fp32_on_cuda_writes_what_the_cpu_writes(make_client) -> None:
    with make_client(device="cpu") as client:
        on_cpu = greedy_text(client)
    with make_client(device="cuda") as client:
        assert greedy_text(client) == on_cpu
