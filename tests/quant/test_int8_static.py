"""int8-static: the static W8A8 kernels, the activation observers, SmoothQuant's folding, and the mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import quant
from quant.calibration import CalibrationContext
from quant.kernels.int8_static import int8_static_linear, quantize_static, reference_int8_static_linear
from quant.kernels.reference import int8_dynamic_linear
from quant.layers.int8 import Int8DynamicLinear
from quant.layers.int8_static import Int8StaticLinear
from quant.observers import HistogramObserver
from quant.primitives import quantize_symmetric
from quant.smoothquant import ALPHA_GRID, apply_smoothing, best_alpha, llama_groups, output_error, smoothing_factors


def int8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q, scale = quantize_symmetric(torch.randn(n, k, generator=generator) * 0.05, bits=8)
    return q.reshape(n, k).contiguous(), scale.reshape(n).float().contiguous()


# ---- kernels -----------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 130])  # decode, a few rows, past the prefill threshold
def test_native_op_matches_the_reference_and_saturates(isa, rows: int) -> None:
    w, w_scale = int8_weight(48, 160, 0)  # K not a multiple of 128: the padded tail
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(1)) * 2
    x[0, 5] = 400.0  # beyond 127 steps: saturates to 127, in both
    act_scale = torch.tensor([0.03])
    bias = torch.randn(48)
    got = torch.ops.quantserve.int8_static_linear(x, w, w_scale, act_scale, bias)
    want = reference_int8_static_linear(x, w, w_scale, act_scale, bias)
    # the same integer sums; only the float epilogue's order may differ
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert quantize_static(x, act_scale)[0, 5] == 127
    assert int8_static_linear(x, w, w_scale, act_scale, bias).shape == (rows, 48)


@pytest.mark.parametrize("rows", [1, 4])
def test_the_packed_decode_kernel_matches_the_op(isa, rows: int) -> None:
    """The native step's int8_static tiles (NativeLinear): the same codes as the torch op, any batch."""
    w, w_scale = int8_weight(40, 96, 4)  # 40 rows: a partial last tile of 16
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(5))
    x[0, 1] = -90.0  # saturates
    act_scale, bias = torch.tensor([0.02]), torch.randn(40)
    packed = torch.classes.quantserve.NativeLinear("int8_static", [w, w_scale, act_scale], 0, bias, 2)
    want = torch.ops.quantserve.int8_static_linear(x, w, w_scale, act_scale, bias)
    torch.testing.assert_close(packed.forward(x), want, rtol=1e-6, atol=1e-5)


def test_static_with_the_rows_own_scale_is_dynamic() -> None:
    w, w_scale = int8_weight(32, 64, 2)
    x = torch.randn(1, 64)
    own = x.abs().max() / 127
    torch.testing.assert_close(
        reference_int8_static_linear(x, w, w_scale, own.reshape(1), None), int8_dynamic_linear(x, w, w_scale, None)
    )


def test_bad_activation_scales_are_refused(ops) -> None:
    linear = nn.Linear(64, 16)
    with pytest.raises(ValueError, match="act_scale"):
        Int8StaticLinear.from_linear(linear, 0.0)
    w, w_scale = int8_weight(16, 64, 0)
    with pytest.raises(RuntimeError, match="act_scale"):
        torch.ops.quantserve.int8_static_linear(torch.randn(1, 64), w, w_scale, torch.tensor([-1.0]), None)


# ---- observers ---------------------------------------------------------------------------


def heavy_tailed(n: int = 100_000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator)
    x[:10] *= 60  # 0.01% outliers, as LLM activations have
    return x


def fake_quant_mse(x: torch.Tensor, clip: float) -> float:
    step = torch.tensor([clip / 127])
    return ((quantize_static(x, step).float() * step - x) ** 2).mean().item()


def test_observers_choose_their_clipping_values() -> None:
    x = heavy_tailed()
    observer = HistogramObserver(float(x.abs().max()))
    for chunk in x.split(25_000):
        observer.observe(chunk)
    clips = {m: observer.clip(m) for m in ("minmax", "percentile", "mse")}
    assert clips["minmax"] == pytest.approx(float(x.abs().max()))
    # percentile: about 0.01% of |x| above its clip (the histogram's bins are 0.4% wide)
    above = (x.abs() > clips["percentile"]).float().mean().item()
    assert 0.00005 <= above <= 0.0002
    # mse: the clip with the least quantization error, within the histogram's resolution
    errors = {m: fake_quant_mse(x, c) for m, c in clips.items()}
    assert clips["mse"] < clips["minmax"] and errors["mse"] < errors["minmax"]
    for clip in torch.linspace(1, clips["minmax"], 20).tolist():
        assert errors["mse"] <= fake_quant_mse(x, clip) * 1.05
    with pytest.raises(ValueError, match="observer"):
        observer.clip("median")


def test_an_input_that_is_always_zero_gets_a_harmless_step() -> None:
    observer = HistogramObserver(0.0)
    observer.observe(torch.zeros(10))
    assert 0 < observer.clip("mse") < 1e-6


# ---- SmoothQuant -------------------------------------------------------------------------


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: o_proj's columns of one KV group share a factor
        **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so that folding into them is visible
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2)
    return model


def test_smoothing_keeps_the_float_model_and_flattens_the_inputs() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    groups = llama_groups(model)
    assert [g.fold for g in groups[:4]] == ["norm", "rows", "norm", "rows"] and len(groups) == 8
    # an outlier channel in every group's input statistic
    stats = []
    for group in groups:
        channels = group.channel_map.numel()
        act = torch.ones(channels)
        act[3] = 50.0
        stats.append(act)
    factors = [smoothing_factors(model, g, a, 0.5) for g, a in zip(groups, stats, strict=True)]
    o_factors = factors[1]
    assert o_factors.numel() == 2 * 16  # per V row: kv_heads x head_dim, shared by the group's query heads
    for group, f in zip(groups, factors, strict=True):
        apply_smoothing(model, group, f)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # the same function
    for group, act, f in zip(groups, stats, factors, strict=True):
        smoothed = act / f[group.channel_map]
        assert smoothed.max() / smoothed.median() < act.max() / act.median()  # the outlier moved to W


def test_smoothquant_lowers_the_static_error_of_a_layer_with_outlier_channels() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=generator)
    x[:, [7, 40]] *= 80  # two outlier channels
    linear = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 128, generator=generator) * 0.05)
        exact = linear(x)

    def static_error(layer_x: torch.Tensor, weight: torch.Tensor) -> float:
        smoothed = nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            smoothed.weight.copy_(weight)
            layer = Int8StaticLinear.from_linear(smoothed, float(layer_x.abs().max() / 127))
            return ((layer(layer_x) - exact).norm() / exact.norm()).item()

    alpha = 0.5
    s = x.abs().amax(0).pow(alpha) / linear.weight.abs().amax(0).pow(1 - alpha)
    plain = static_error(x, linear.weight.detach())
    smooth = static_error(x / s, linear.weight.detach() * s)
    assert smooth < plain / 3


# ---- the mode ----------------------------------------------------------------------------


class ByteTokenizer:
    """Enough of a tokenizer for calibration: one id per UTF-8 byte, within the tiny vocabulary."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [b % 300 for b in text.encode()]}


def calibrated(model: nn.Module, cache: Path | None = None, **options) -> quant.QuantReport:
    config = quant.make_config("int8-static", quant.QuantOptions(calibration_tokens=2048, **options))
    return quant.quantize_(model, config, calibration=CalibrationContext(ByteTokenizer(), "tiny", cache))


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_the_tiny_model_end_to_end(tmp_path: Path, observer: str) -> None:
    reference = tiny_llama()
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = reference(ids).logits
    model = tiny_llama()
    # α 0.5: a random model has no activation outliers to migrate (the default 0.85 suits the real one)
    options = {"activation_observer": observer, "quantize_lm_head": "false", "smoothquant_alpha": 0.5}
    report = calibrated(model, tmp_path, **options)
    assert (report.layers_quantized, report.layers_fallback) == (15, 0)  # the untied head too
    assert report.calibration is not None and report.calibration.details["smoothed_groups"] == 8
    layers = model.model.layers
    attn, mlp = layers[0].self_attn, layers[0].mlp
    # down_proj (the default dynamic_activation_modules) keeps per-token steps, the rest is static
    assert type(mlp.down_proj) is Int8DynamicLinear
    assert all(type(m) is Int8StaticLinear for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.up_proj))
    details = report.calibration.details
    assert details["dynamic_layers"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    # readers of one input share one step (the native step quantizes it once)
    assert attn.q_proj.act_scale == attn.k_proj.act_scale == attn.v_proj.act_scale
    assert mlp.gate_proj.act_scale == mlp.up_proj.act_scale
    dynamic = tiny_llama()
    quant.quantize_(dynamic, quant.make_config("int8-dynamic", quant.QuantOptions(quantize_lm_head="false")))
    with torch.no_grad():
        logits = model(ids).logits
        dynamic_error = ((dynamic(ids).logits - exact).norm() / exact.norm()).item()
    # one step per input, fixed in advance, against one per token: a few times the error, not more
    assert ((logits - exact).norm() / exact.norm()).item() < 4 * dynamic_error
    # the second start reads the cache and serves the same model
    again = tiny_llama()
    second = calibrated(again, tmp_path, **options)
    assert second.calibration is not None and second.calibration.cached
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits, rtol=0, atol=0)


def test_alpha_zero_smooths_nothing() -> None:
    model = tiny_llama()
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    report = calibrated(model, smoothquant_alpha=0.0)
    assert report.calibration is not None and report.calibration.details["smoothed_groups"] == 0
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)


def test_the_knobs_are_checked() -> None:
    for bad in (1.5, "-0.1", "half"):
        with pytest.raises(ValueError, match="smoothquant alpha must be auto or between 0 and 1"):
            quant.QuantOptions(smoothquant_alpha=bad)
    assert quant.QuantOptions(smoothquant_alpha=0.5).smoothquant_alpha == "0.5"  # one spelling: the cache key
    assert quant.QuantOptions(smoothquant_alpha=" AUTO").smoothquant_alpha == "auto"
    with pytest.raises(ValueError, match="not a module name pattern"):
        quant.QuantOptions(dynamic_activation_modules=("down proj",))
    with pytest.raises(ValueError, match="activation observer must be one of minmax, percentile or mse"):
        quant.QuantOptions(activation_observer="histogram")


def outlier_rows(generator: torch.Generator) -> tuple[torch.Tensor, nn.Linear]:
    x = torch.randn(512, 128, generator=generator)
    x[:, [7, 40]] *= 80  # two outlier channels
    linear = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 128, generator=generator) * 0.05)
    return x, linear


def test_the_alpha_search_takes_the_grid_point_with_the_least_output_error() -> None:
    from quant.smoothquant import SmoothGroup

    x, linear = outlier_rows(torch.Generator().manual_seed(0))
    model = nn.Module()
    model.reader = linear
    group = SmoothGroup("g", ("reader",), "source", "rows", torch.arange(128))
    absmax = x.abs().amax(0)
    for per_token in (False, True):
        errors = {a: output_error(model, group, x, absmax, a, per_token) for a in ALPHA_GRID}
        chosen = best_alpha(model, group, x, absmax, per_token)
        assert errors[chosen] == min(errors.values())
        assert errors[chosen] < errors[0.0] / 3  # the outliers are worth migrating
    # the measured error is the real one: α 0 static is the plain static layer's
    exact = x @ linear.weight.detach().t()
    layer = Int8StaticLinear.from_linear(linear, float(absmax.max() / 127))
    with torch.no_grad():
        plain = float((layer(x) - exact).pow(2).sum())
    assert output_error(model, group, x, absmax, 0.0, False) == pytest.approx(plain, rel=1e-4)


def test_auto_alpha_and_static_down_proj_end_to_end(tmp_path: Path) -> None:
    model = tiny_llama()
    options = {"quantize_lm_head": "false", "dynamic_activation_modules": ()}
    report = calibrated(model, tmp_path, **options)  # smoothquant_alpha: auto, the default
    details = report.calibration.details
    assert details["smoothquant_alpha"] == "auto" and details["dynamic_layers"] == []
    assert set(details["alpha_by_kind"]) == {"qkv", "o", "gate_up", "down"}
    assert all(len(a) == 2 and set(a) <= set(ALPHA_GRID) for a in details["alpha_by_kind"].values())
    assert type(model.model.layers[1].mlp.down_proj) is Int8StaticLinear
    # minmax's step comes from pass 1's maxima: the largest smoothed input calibration showed, exactly
    smoothed = tiny_llama()
    quant.make_config("int8-static", quant.QuantOptions(**options)).apply_calibration(
        smoothed, {k: v for k, v in report_state(tmp_path).items() if k.startswith("smooth.")}
    )
    seen = []
    hook = smoothed.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    from quant.calibration import calibration_sequences, read_calibration_text

    text, _ = read_calibration_text("")
    with torch.no_grad():
        smoothed(calibration_sequences(ByteTokenizer(), text, 2048))
    hook.remove()
    step = float(model.model.layers[1].mlp.down_proj.act_scale)
    assert step * 127 == pytest.approx(float(max(seen)), rel=1e-5)
    again = tiny_llama()
    assert calibrated(again, tmp_path, **options).calibration.cached
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def report_state(cache: Path) -> dict[str, torch.Tensor]:
    """The one cached calibration state under `cache`."""
    from safetensors.torch import load_file

    (entry,) = [p for p in cache.rglob("*.safetensors")]
    return load_file(entry)


def test_a_linear_calibration_never_saw_stays_float() -> None:
    assert quant.make_config("int8-static").quantize_linear(nn.Linear(64, 8)) is None


def test_the_tiny_checkpoint_loads_and_calibrates(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = quant.make_config("int8-static", quant.QuantOptions(calibration_tokens=1024))
    report = quant.quantize_(model, config, calibration=CalibrationContext(tokenizer, "tiny", None))
    assert report.layers_fallback == 0 and report.calibration is not None
    assert report.calibration.tokens == 1024
