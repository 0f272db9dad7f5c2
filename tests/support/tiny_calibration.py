"""The tiny Llama (tests/conftest.py) and a few calibration sequences, for the calibrated modes' tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

_CHARACTERS = 40_000  # of Python's topics: ~10k tokens of the tiny tokenizer, enough and quick to tokenize


def load_tiny_llama(model_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def tiny_sequences(model_dir: Path, tokens: int = 256, length: int = 64) -> torch.Tensor:
    """`tokens` tokens from the start of Python's topics (the default calibration text), in sequences of `length`."""
    from transformers import AutoTokenizer

    from quant.calibration import calibration_sequences, read_calibration_text

    text, _ = read_calibration_text("")
    return calibration_sequences(AutoTokenizer.from_pretrained(model_dir), text[:_CHARACTERS], tokens, length)


def tiny_llama_and_sequences(model_dir: Path, tokens: int = 256, length: int = 64) -> tuple[nn.Module, torch.Tensor]:
    return load_tiny_llama(model_dir), tiny_sequences(model_dir, tokens, length)
