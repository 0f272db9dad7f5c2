"""Calibration data and the calibration cache (`quant.calibration`), with a toy calibrated mode."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from quant.api import quantize_
from quant.calibration import (
    DEFAULT_SOURCE,
    CalibrationContext,
    CalibrationError,
    calibration_sequences,
    read_calibration_text,
)
from quant.config import CalibratedConfig
from quant.layers.int8 import Int8WeightOnlyLinear


@dataclass(frozen=True)
class _MeanInputScale(CalibratedConfig):
    """Toy calibrated mode: scales each linear's weight by the mean |input| it saw, then int8.
    `calls` counts real calibrations, so a test can tell a cache hit from a run."""

    name: ClassVar[str] = "toy-calibrated"
    description: ClassVar[str] = "test only"
    bits: ClassVar[float] = 8
    calls: ClassVar[list[int]] = []

    def calibrate(self, model: nn.Module, sequences: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        type(self).calls.append(sequences.numel())
        seen: dict[str, torch.Tensor] = {}

        def record(name: str) -> Any:
            def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                seen.setdefault(name, args[0].abs().mean())

            return hook

        hooks = [
            module.register_forward_hook(record(name))
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        ]
        with torch.no_grad():
            model(sequences[:1])
        for hook in hooks:
            hook.remove()
        self.apply_calibration(model, seen)
        return seen, {"linears": len(seen)}

    def apply_calibration(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, scale in state.items():
                model.get_submodule(name).weight.mul_(scale)

    def quantize_linear(self, linear: nn.Linear) -> nn.Module | None:
        return Int8WeightOnlyLinear.from_linear(linear)


@pytest.fixture
def tiny(tiny_model_dir: Path):
    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    return load, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_default_source_is_pythons_own_topics() -> None:
    text, label = read_calibration_text("")
    assert label == DEFAULT_SOURCE
    assert len(text) > 300_000 and 'The "assert" statement' in text


@pytest.mark.parametrize(
    ("content", "complaint"), [(None, "is not a file"), (b"  \n", "is empty"), (b"\xff\xfe\xfa", "not UTF-8")]
)
def test_a_bad_file_names_the_variable(tmp_path: Path, content: bytes | None, complaint: str) -> None:
    path = tmp_path / "calibration.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CalibrationError, match=f"QS_CALIBRATION_FILE: .*{complaint}"):
        read_calibration_text(str(path))


def test_sequences_take_the_budget_and_refuse_more_than_the_text(tiny) -> None:
    _, tokenizer = tiny
    text, _ = read_calibration_text("")
    sequences = calibration_sequences(tokenizer, text, 1024)
    assert sequences.shape == (2, 512) and sequences.dtype == torch.long
    with pytest.raises(CalibrationError, match=r"QS_CALIBRATION_TOKENS: 100000 tokens asked.*only"):
        calibration_sequences(tokenizer, "a short text", 100_000)


def test_calibration_runs_once_then_comes_from_the_cache(tiny, tmp_path: Path) -> None:
    load, tokenizer = tiny
    config = _MeanInputScale(calibration_tokens=1024)
    context = CalibrationContext(tokenizer, "tiny", tmp_path)
    _MeanInputScale.calls.clear()

    first_model = load()
    first = quantize_(first_model, config, calibration=context)
    second_model = load()
    second = quantize_(second_model, config, calibration=context)

    assert _MeanInputScale.calls == [1024]  # the second start read the cache
    assert first.calibration is not None and not first.calibration.cached
    assert second.calibration is not None and second.calibration.cached
    assert second.calibration.seconds == first.calibration.seconds  # the original run's time, reported again
    assert (first.calibration.source, first.calibration.tokens) == (DEFAULT_SOURCE, 1024)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(first_model(ids).logits, second_model(ids).logits, rtol=0, atol=0)

    # Another budget is another result: calibrated again.
    quantize_(load(), _MeanInputScale(calibration_tokens=512), calibration=context)
    assert _MeanInputScale.calls == [1024, 512]

    # So is a new version of the algorithm: the old entry is not read.
    @dataclass(frozen=True)
    class _NextVersion(_MeanInputScale):
        algorithm_version: ClassVar[int] = 2

    quantize_(load(), _NextVersion(calibration_tokens=1024), calibration=context)
    assert _MeanInputScale.calls == [1024, 512, 1024]


def test_a_calibrated_mode_without_a_context_fails_clearly(tiny) -> None:
    load, _ = tiny
    with pytest.raises(CalibrationError, match="toy-calibrated is a calibrated mode"):
        quantize_(load(), _MeanInputScale())
