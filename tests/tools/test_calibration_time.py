"""tools.calibration_time on the tiny model: it really calibrates (no cache) and reports each mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import calibration_time


def test_each_mode_is_calibrated_and_timed(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["--modes", "int4-gptq,int4-awq", "--tokens", "512", "--group-size", "32", "--threads", "1"]
    argv += ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)]
    assert calibration_time.main(argv) == 0
    out = capsys.readouterr().out
    assert "int4-gptq: " in out and "int4-awq: " in out and "512 tokens of pydoc_data.topics" in out
    assert not (tmp_path / "calibrated").exists()  # a first start's cost: nothing cached


def test_a_mode_without_calibration_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="int4 is not a calibrated mode"):
        calibration_time.main(["--modes", "int4", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)])
