"""The quality tool: windows, scoring, the evaluate loop, the CLI, and the WikiText-2 bounds (slow)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import quant
from quant.checkpoints import load_float_model
from tests.support.modes import QUANTIZED_MODES, bits
from tools import quality

WIKITEXT = Path("/work/shared/data/wikitext-2/test.txt")


@given(n_tokens=st.integers(2, 3000), context=st.integers(2, 600), data=st.data())
def test_windows_score_every_token_once_with_context(n_tokens: int, context: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, context))
    windows = quality.sliding_windows(n_tokens, context, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert scored == list(range(1, n_tokens))  # every token but the first, once, in order
    for w in windows:
        assert 0 <= w.begin < w.first_target <= w.end <= n_tokens and w.end - w.begin <= context
        # every scored token sees at least context - stride tokens before it (or all there are), and one at least
        assert w.first_target - w.begin >= max(1, min(context - stride, w.first_target))


def test_windows_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="stride"):
        quality.sliding_windows(100, 10, 11)
    with pytest.raises(ValueError, match="context >= 2"):
        quality.sliding_windows(100, 1, 1)
    with pytest.raises(ValueError, match="2 tokens"):
        quality.sliding_windows(1, 10, 10)


def test_tokenize_takes_the_budget_from_the_start(tiny_model_dir: Path) -> None:
    _, tokenizer, _ = load_float_model(str(tiny_model_dir))
    text = quality.load_text(None)
    ids = quality.tokenize(tokenizer, text, 300)
    assert len(ids) == 300
    assert ids.tolist() == tokenizer(text[:5000], add_special_tokens=False)["input_ids"][:300]


def test_single_window_score_matches_the_model_loss(tiny_model_dir: Path) -> None:
    model, tokenizer, _ = load_float_model(str(tiny_model_dir))
    ids = quality.tokenize(tokenizer, quality.load_text(None), 200)
    scores = quality.score(model, ids, context=256, stride=256)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert scores.count == 199 and len(scores.top1) == 199
    assert scores.nll_sum / scores.count == pytest.approx(loss, rel=1e-4)


def test_overlapping_windows_give_the_same_predictions_as_one_window_when_context_covers_them(
    tiny_model_dir: Path,
) -> None:
    model, tokenizer, _ = load_float_model(str(tiny_model_dir))
    ids = quality.tokenize(tokenizer, quality.load_text(None), 120)
    calls: list[tuple[int, int]] = []
    sliding = quality.score(model, ids, context=64, stride=32, on_window=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (119, 119) and len(calls) == len(quality.sliding_windows(120, 64, 32))
    whole = quality.score(model, ids, context=120, stride=120)
    # the first window's predictions see the same context in both runs (ties aside)
    assert (sliding.top1[:63] == whole.top1[:63]).float().mean() > 0.95
    assert sliding.count == whole.count == 119


def test_evaluate_compares_every_mode_with_fp32(tiny_model_dir: Path) -> None:
    progress = io.StringIO()
    results = list(
        quality.evaluate(
            ["int8", "int4"], model=str(tiny_model_dir), max_tokens=300, context=128, stride=96, progress=progress
        )
    )
    assert [r.mode for r in results] == ["fp32", "int8", "int4"]
    fp32, int8, int4 = results
    assert fp32.mode == quant.REFERENCE_MODE
    assert fp32.agreement == 1.0 and fp32.quantized_ratio is None
    assert int8.agreement > 0.9 and int4.agreement > 0.5
    # On this random tiny model both shifts are tiny and their order is noise (int4 scores its
    # 128-token windows through the de-quantized GEMM, unrounded activations): bound each one.
    for mode in (int8, int4):
        assert 0 < abs(math.log(mode.perplexity / fp32.perplexity)) < 0.1
    assert int4.weight_bytes < int8.weight_bytes < fp32.weight_bytes
    assert all(r.tokens_scored == 299 for r in results)
    assert "[int4] 299/299 tokens scored" in progress.getvalue()
    table = quality.format_table(results)
    assert table.count("\n") == 4 and "| int4 |" in table and "+0.00%" in table


def test_cli_prints_the_table_and_writes_json(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    args = ["--model", str(tiny_model_dir), "--modes", "int8", "--max-tokens", "200", "--context", "128"]
    assert quality.main([*args, "--stride", "128", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "| fp32 |" in printed.out and "| int8 |" in printed.out
    assert "[int8]" in printed.err  # progress
    assert [r["mode"] for r in json.loads(out.read_text())] == ["fp32", "int8"]


def test_cli_rejects_unknown_modes(capsys) -> None:
    assert quality.main(["--modes", "int3"]) == 2
    assert "unknown mode(s) int3" in capsys.readouterr().err


# Issue 4's bounds on the perplexity increase over fp32 (WikiText-2 test), by bits per weight;
# fp8 and int8-static have their own. A mode that misses is listed in MISSES with its measured figure: the bound
# itself is not loosened.
PPL_BOUND_BY_BITS = {8: 0.01, 4: 0.10}
PPL_BOUND_OF_MODE = {"fp8": 0.03, "int8-static": 0.02}  # int8-static: issue 14's target
PPL_BOUND = {m: PPL_BOUND_OF_MODE.get(m, PPL_BOUND_BY_BITS[bits(m)]) for m in QUANTIZED_MODES}
# Measured with SLOW_BUDGET, native kernels (quantserve-avx512vnni), fp32 perplexity 18.473.
_W8A8 = "per-token int8 activations lose precision on this 135M model's activation outliers (|x| up to ~3000)"
_GRID = "4-bit at group 64 on a 135M model whose weights sit on a group-32 4-bit grid that group 64 cannot follow"
MISSES: dict[str, str] = {
    "int8-dynamic": f"measured +3.56%: {_W8A8}",
    "int8-mixed": f"measured +1.56%: features under the threshold 6 still take the int8 rounding; {_W8A8}",
    "bnb-int8": f"measured +1.93%: LLM.int8() as int8-mixed; {_W8A8}",
    "int4": f"measured +32.6% in quantserve-bench (4096 tokens; +33.9% before int4's float GEMM from 128 rows): {_GRID}",
    "int4-hqq": f"measured +25.7% in quantserve-bench (4096 tokens; +27.7% before int4's float GEMM from 128 rows): {_GRID}",
    "nf4": f"measured +19.6%: {_GRID}",
    "bnb-nf4": f"measured +19.5%: {_GRID}",
    "bnb-fp4": f"measured +37.8%: FP4's coarse levels; {_GRID}",
}
SLOW_BUDGET = {"max_tokens": 4096, "context": 1024, "stride": 768}


@pytest.fixture(scope="module")
def wikitext_results() -> dict[str, quality.QualityResult]:
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} not found")
    return {r.mode: r for r in quality.evaluate(list(PPL_BOUND), text=WIKITEXT, **SLOW_BUDGET)}


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize(
    "mode",
    [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=MISSES[m])) if m in MISSES else m for m in PPL_BOUND],
)
def test_wikitext2_perplexity_increase_within_bound(mode: str, wikitext_results) -> None:
    result, reference = wikitext_results[mode], wikitext_results[quant.REFERENCE_MODE]
    increase = result.perplexity / reference.perplexity - 1
    assert increase <= PPL_BOUND[mode], f"{mode}: perplexity {result.perplexity:.3f}, {100 * increase:+.2f}% vs fp32"


def test_kl_per_position_is_the_textbook_sum() -> None:
    torch.manual_seed(0)
    reference, mode = torch.log_softmax(torch.randn(4, 50), -1), torch.log_softmax(torch.randn(4, 50), -1)
    expected = (reference.exp() * (reference - mode)).sum(-1)
    torch.testing.assert_close(quality.kl_per_position(reference, mode), expected)
    assert torch.equal(quality.kl_per_position(reference, reference), torch.zeros(4))


def test_reference_log_probs_come_back_exactly_from_their_file(tmp_path: Path) -> None:
    table = quality.ReferenceLogProbs(tmp_path / "ref.npy", positions=7, vocabulary=11)
    first, second = torch.randn(3, 11), torch.randn(4, 11)
    table.write(first)
    table.write(second)
    assert torch.equal(table.read(0, 3), first) and torch.equal(table.read(3, 4), second)


def test_evaluate_reports_kl_against_fp32_and_quantization_time(tiny_model_dir: Path) -> None:
    results = list(
        quality.evaluate(["int4"], model=str(tiny_model_dir), max_tokens=300, context=128, stride=96, progress=None)
    )
    fp32, int4 = results
    assert fp32.kl_mean == 0.0 and fp32.kl_p99 == 0.0 and fp32.top1_differs == 0.0
    assert 0 < int4.kl_mean <= int4.kl_p99
    assert int4.top1_differs == pytest.approx(1 - int4.agreement)
    assert int4.quantize_seconds > 0 and int4.calibration_seconds is None and not int4.warnings
    # the same KL, recomputed from both models' own log-probs over the same windows
    ids = quality.tokenize(load_float_model(str(tiny_model_dir))[1], quality.load_text(None), 300)
    logprobs = {}
    for mode in ("fp32", "int4"):
        model, _, _ = load_float_model(str(tiny_model_dir))
        quant.quantize_(model, quant.make_config(mode))
        with torch.no_grad():
            rows = [
                torch.log_softmax(model(input_ids=ids[w.begin : w.end][None]).logits[0].float(), -1)[
                    w.first_target - w.begin - 1 : w.end - w.begin - 1
                ]
                for w in quality.sliding_windows(len(ids), 128, 96)
            ]
        logprobs[mode] = torch.cat(rows)
    direct = quality.kl_per_position(logprobs["fp32"], logprobs["int4"])
    assert int4.kl_mean == pytest.approx(direct.mean().item(), rel=1e-3)
    table = quality.format_table(results)
    assert "KL mean" in table and f"{int4.kl_mean:.4f}" in table


def test_a_mode_on_another_checkpoint_is_compared_with_the_same_reference(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    other = tmp_path / "other"
    model, tokenizer, _ = load_float_model(str(tiny_model_dir))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    out = tmp_path / "results.json"
    args = ["--model", str(tiny_model_dir), "--modes", f"fp32@{other}", "--max-tokens", "200", "--context", "128"]
    args += ["--stride", "128"]
    assert quality.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["fp32", f"fp32@{other}"]
    assert rows[1]["kl_mean"] > 0 and rows[1]["perplexity"] != rows[0]["perplexity"]
    assert f"| fp32@{other} |" in capsys.readouterr().out


def test_eval_warns_loudly_when_a_checkpoint_was_trained_on_the_evaluation_text(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(quality.load_text(None)[:20000])
    checkpoint = tmp_path / "qat"
    model, tokenizer, _ = load_float_model(str(tiny_model_dir))
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    (checkpoint / "qat.json").write_text(json.dumps({"calibration_source": str(text.resolve())}))
    out = tmp_path / "results.json"
    args = ["--model", str(tiny_model_dir), "--modes", f"int4@{checkpoint}", "--max-tokens", "150", "--context", "128"]
    args += ["--stride", "128"]
    assert quality.main([*args, "--text", str(text), "--json", str(out), "--no-kl"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("WARNING: the evaluation text") and "trained (quantserve-qat)" in printed.out
    assert -1 < printed.err.find("WARNING: the evaluation text") < printed.err.find("[fp32]")  # before the runs
    assert all(r["warnings"] and r["kl_mean"] is None for r in json.loads(out.read_text()))
    # another text: no warning
    other = tmp_path / "other.txt"
    other.write_text(quality.load_text(None)[20000:40000])
    assert quality.main([*args, "--text", str(other), "--no-kl"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_calibration_warning_names_a_calibrated_mode_fitted_to_the_text(tmp_path: Path) -> None:
    from quant.config import CalibratedConfig

    text = tmp_path / "text.txt"
    text.write_text("some calibration text")

    class Calibrated(CalibratedConfig):  # the check reads only the config's name, flag and file
        name = "calibrated-test"

    same = Calibrated(calibration_file=str(text))
    other = Calibrated(calibration_file="")
    assert "calibrated-test is calibrated on the evaluation text" in quality.calibration_warnings(text, [same], [])[0]
    assert quality.calibration_warnings(text, [other], []) == []
    # the default evaluation text is the default calibration text
    assert quality.calibration_warnings(None, [other], [])
