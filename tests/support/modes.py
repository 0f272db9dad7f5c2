"""The tests' lists of precision modes, derived from the registry so that a new mode joins
the right tests without editing them: `quant.list_modes()` and each config's attributes."""

from __future__ import annotations

import quant

ALL_MODES = quant.list_modes()
# Float baselines cast the whole model; every other mode replaces the linear layers.
FLOAT_MODES = [m for m in ALL_MODES if not quant.make_config(m).replaces_linears]
QUANTIZED_MODES = [m for m in ALL_MODES if m not in FLOAT_MODES]
BNB_MODES = [m for m in ALL_MODES if quant.get_mode(m).backend == "bitsandbytes"]
# Calibrated modes need calibration text and (GPTQ, AWQ) a Llama-family model: tests on other
# models (tiny GPT-2) take the others; each calibrated mode has its own tests on the tiny Llama.
CALIBRATED_MODES = [m for m in ALL_MODES if quant.get_mode(m).calibrated]
CALIBRATION_FREE_QUANTIZED_MODES = [m for m in QUANTIZED_MODES if m not in CALIBRATED_MODES]

# What the issues ask for, checked against the registry (not derived from it, or the check would be empty).
ISSUE_FLOAT_MODES = ("fp32", "bf16", "fp16")
# The modes docker-compose.yml and deploy/k8s must serve at least (a deployment choice, not a mode attribute).
REQUIRED_DEPLOYED_MODES = frozenset({quant.REFERENCE_MODE, "int8", "int4", "nf4"})


def bits(mode: str) -> float:
    """Bits per weight of the mode's storage, as the registry declares it."""
    return quant.get_mode(mode).bits
