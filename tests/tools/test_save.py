"""`quantserve-save`: what it writes, and the inputs it refuses with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

from quant.prequantized import SAVED_MANIFEST
from tools.save import main


def test_writes_weights_config_tokenizer_and_manifest(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "int8"
    assert main(["--model", str(tiny_model_dir), "--precision", "int8", "--out", str(out)]) == 0
    names = {f.name for f in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", SAVED_MANIFEST} <= names
    manifest = json.loads((out / SAVED_MANIFEST).read_text())
    assert manifest["mode"] == "int8" and manifest["source_model"] == str(tiny_model_dir)
    assert "saved int8" in capsys.readouterr().out


def test_refuses_a_directory_that_is_not_empty(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("x")
    assert main(["--model", str(tiny_model_dir), "--precision", "int8", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_refuses_an_unknown_precision_in_one_line(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["--model", str(tiny_model_dir), "--precision", "int3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "invalid QS_PRECISION: unknown precision 'int3'" in err and err.count("\n") == 1


def test_refuses_a_layer_it_cannot_store(tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import quant.saved as saved

    monkeypatch.setattr(saved, "SAVABLE_LAYERS", {})  # as bitsandbytes' layers, whose state is not in buffers
    assert main(["--model", str(tiny_model_dir), "--precision", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "cannot be saved" in capsys.readouterr().err
