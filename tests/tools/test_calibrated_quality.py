"""Issue 14's targets for the calibrated int4 modes on the default model (slow): WikiText-2 test,
8,192 tokens, group size 64, calibration on the default text (Python's topics), the perplexity
increase over fp32 against round-to-nearest int4's. A target missed is an xfail with its measured figure."""

from __future__ import annotations

import pytest

from tests.tools.test_quality import WIKITEXT
from tools import quality

# Share of int4's perplexity increase over fp32 each mode may keep.
TARGET_SHARE = {"int4-gptq": 0.6, "int4-awq": 0.75}
# (int4-gptq measured 0.20x: +7.09% against int4's +34.99%, 2026-12-04, searched and refitted group parameters)
MISSES: dict[str, str] = {}


@pytest.fixture(scope="module")
def results() -> dict[str, quality.QualityResult]:
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} not found")
    runs = quality.evaluate(["int4", *TARGET_SHARE], text=WIKITEXT, max_tokens=8192)
    return {r.mode: r for r in runs}


@pytest.mark.slow
@pytest.mark.real_model
# fp32, int4 and two calibrated modes over 8,192 tokens, plus two calibrations of about 2 min each:
# about 10 min on a quiet 2-core machine, more than the suite's 600 s limit
@pytest.mark.timeout(2400)
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=MISSES[m])) if m in MISSES else m
        for m in TARGET_SHARE
    ],
)
def test_calibrated_int4_recovers_its_share_of_rtns_loss(mode: str, results) -> None:
    def increase(name: str) -> float:
        return results[name].perplexity / results["fp32"].perplexity - 1

    assert results[mode].layers_quantized == 30 * 7 + 1  # every linear in int4 storage, and the int8 head
    assert increase(mode) <= TARGET_SHARE[mode] * increase("int4"), (
        f"{mode}: {100 * increase(mode):+.2f}% against int4's {100 * increase('int4'):+.2f}%"
    )
