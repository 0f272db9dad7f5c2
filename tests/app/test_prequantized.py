"""The service on pre-quantized checkpoints: the precision a checkpoint carries, one-line errors, and a bad
checkpoint that never serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.settings import SettingsError, load_settings
from quant.prequantized import SAVED_MANIFEST
from tests.support.gguf_files import write_tiny_gguf
from tools.save import main as save_main

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def saved_int4(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "int4"
    assert (
        save_main(["--model", str(tiny_model_dir), "--precision", "int4", "--group-size", "32", "--out", str(out)]) == 0
    )
    return out


def test_a_saved_checkpoint_brings_its_precision(saved_int4: Path) -> None:
    assert load_settings(model=str(saved_int4)).precision == "int4"
    assert load_settings(model=str(saved_int4), precision="int4").precision == "int4"
    assert load_settings(model=str(saved_int4), precision="native").precision == "native"


def test_another_precision_on_a_saved_checkpoint_is_one_clear_line(saved_int4: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(model=str(saved_int4), precision="int8")
    message = str(caught.value)
    assert "\n" not in message
    assert str(saved_int4) in message and "int4" in message and "QS_PRECISION=int8" in message


def test_native_needs_a_prequantized_model(tiny_model_dir: Path) -> None:
    with pytest.raises(SettingsError, match="QS_PRECISION=native needs a pre-quantized QS_MODEL"):
        load_settings(model=str(tiny_model_dir), precision="native")


def test_a_gguf_is_quantized_as_before_unless_native_is_asked(tiny_model_dir: Path, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf", tmp_path / "cache")
    assert load_settings(model=str(gguf), precision="int8").precision == "int8"
    assert load_settings(model=str(gguf), precision="native").precision == "native"


def test_a_corrupt_manifest_stops_the_settings(saved_int4: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / SAVED_MANIFEST).write_text("{")
    with pytest.raises(SettingsError, match=r"quantserve\.json: cannot be read as JSON"):
        load_settings(model=str(broken))


def test_the_saved_checkpoint_serves_what_the_float_path_serves(make_client, tiny_model_dir: Path, saved_int4: Path):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}
    with make_client(model=str(tiny_model_dir), precision="int4", group_size=32) as client:
        expected = client.post("/generate", json=body).json()
        expected_info = client.get("/info").json()
    with make_client(model=str(saved_int4), precision="int4") as client:
        served = client.post("/generate", json=body).json()
        info = client.get("/info").json()
    assert served == expected
    assert info["precision"] == "int4" and info["weight_bytes"] == expected_info["weight_bytes"]
    assert info["kernels"] == expected_info["kernels"] and info["lm_head"] == expected_info["lm_head"]


def test_the_native_gguf_is_served_with_its_dequantized_tensors_counted(make_client, tiny_model_dir: Path, tmp_path):
    gguf = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf", tmp_path)  # metadata in the service's cache dir
    with make_client(model=str(gguf), precision="native") as client:
        assert client.get("/health").status_code == 200
        info = client.get("/info").json()
        assert client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}).status_code == 200
    assert info["precision"] == "native"
    assert info["quantization"]["layers_fallback"] == 1  # the Q5_0 tensor, de-quantized
    assert info["quantization"]["fallback_examples"] == ["blk.1.attn_v.weight (Q5_0)"]


def test_a_bad_checkpoint_fails_the_start_and_serves_nothing(make_client, saved_int4: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in saved_int4.iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((bad / SAVED_MANIFEST).read_text())
    manifest["modules"]["model.layers.1.mlp.up_proj"]["out_features"] = 96
    (bad / SAVED_MANIFEST).write_text(json.dumps(manifest))
    with make_client(model=str(bad), precision="int4") as client:
        health = client.get("/health")
        generated = client.post("/generate", json={"inputs": PROMPT})
    assert health.status_code == 503 and health.json()["status"] == "failed"
    detail = health.json()["detail"]
    assert str(bad / SAVED_MANIFEST) in detail and "model.layers.1.mlp.up_proj" in detail and "\n" not in detail
    assert generated.status_code == 503


@pytest.mark.parametrize(
    ("method", "options"),
    [("gptq", {"sym": True}), ("awq", {}), ("gptq", {"act_order_in": ("mlp.up_proj",)})],
    ids=["gptq-sym", "awq", "gptq-act-order"],
)
def test_a_gptq_or_awq_checkpoint_is_served_natively(
    make_client, tiny_model_dir: Path, tmp_path: Path, method, options
):
    from tests.support.gptq_files import write_checkpoint

    checkpoint = write_checkpoint(tiny_model_dir, tmp_path / method, method, **options)
    assert load_settings(model=str(checkpoint)).precision == "native"
    with pytest.raises(SettingsError, match="QS_PRECISION=int4 cannot be applied"):
        load_settings(model=str(checkpoint), precision="int4")
    with make_client(model=str(checkpoint), precision="native") as client:
        info = client.get("/info").json()
        generated = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert generated.status_code == 200 and generated.json()["generated_text"]
    assert info["quantization"]["mode"] == f"native ({method})"
    assert info["quantization"]["layers_quantized"] + info["quantization"]["layers_fallback"] == 14


def test_a_quantization_config_we_cannot_serve_stops_the_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.support.gptq_files import write_checkpoint

    checkpoint = write_checkpoint(
        tiny_model_dir, tmp_path / "gptq", "gptq", config_edit=lambda c: c["quantization_config"].update(bits=3)
    )
    with pytest.raises(SettingsError, match="quantization_config cannot be served: bits 3"):
        load_settings(model=str(checkpoint))
