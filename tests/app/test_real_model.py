"""The service on the real embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import load_settings

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def served(default_checkpoint, cache_dir):
    """One running app per precision, shared by the tests of this module."""
    clients: dict[str, TestClient] = {}

    def get(precision: str) -> TestClient:
        if precision not in clients:
            app = create_app(load_settings(precision=precision, cache_dir=cache_dir, device="cpu"))
            client = TestClient(app)
            client.__enter__()
            assert app.state.service.wait_until_loaded(timeout=300)
            clients[precision] = client
        return clients[precision]

    yield get
    for client in clients.values():
        client.__exit__(None, None, None)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_capital_of_france(served, precision):
    response = served(precision).post(
        "/generate", json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 20}}
    )
    assert response.status_code == 200
    assert "Paris" in response.json()["generated_text"]


def test_int8_linear_bytes_below_35_percent_of_fp32(served):
    fp32 = served("fp32").get("/info").json()
    int8 = served("int8").get("/info").json()
    assert fp32["model_id"] == int8["model_id"]
    q = int8["quantization"]
    # fp32 keeps every linear in float: their bytes are what int8 replaced, measured independently.
    fp32_linear_bytes = q["quantized_layers_fp32_bytes"]
    assert q["quantized_layers_bytes"] < 0.35 * fp32_linear_bytes
    assert int8["weight_bytes"] < fp32["weight_bytes"]
    assert fp32["weight_bytes"] - int8["weight_bytes"] == pytest.approx(
        fp32_linear_bytes - q["quantized_layers_bytes"], rel=1e-6
    )
