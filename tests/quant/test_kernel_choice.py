"""Kernels are chosen once per layer: `can_implement`, the chooser, and that what a layer (and the
report) names is what its forward runs, checked by counting the calls that reach each implementation."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
import quant.kernels as qk
from quant.kernels import LinearSpec, choose_kernel, reference
from quant.layers.fp8 import Fp8WeightOnlyLinear
from quant.layers.int4 import Int4WeightOnlyLinear
from quant.layers.int8 import Int8DynamicLinear, Int8WeightOnlyLinear
from quant.layers.int8_mixed import Int8MixedLinear
from quant.layers.nf4 import NF4Linear
from tests.support.env import clean_env

REPO = Path(__file__).resolve().parents[2]
NATIVE_OPS = ("int8_linear", "int8_dynamic_linear", "int4_linear", "nf4_linear", "fp8_linear")
REFERENCE_FNS = ("int8_linear", "int8_dynamic_linear", "int4_linear", "nf4_linear", "fp8_linear")


@pytest.fixture
def calls(ops, monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts of the calls reaching each native op ("quantserve:<op>") and reference function ("reference:<fn>")."""
    counts: Counter = Counter()

    def counted(fn: Callable, key: str) -> Callable:
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    for op in NATIVE_OPS:
        packet = getattr(torch.ops.quantserve, op)
        monkeypatch.setattr(
            torch.ops.quantserve, op, SimpleNamespace(default=counted(packet.default, f"quantserve:{op}"))
        )
    for fn in REFERENCE_FNS:
        monkeypatch.setattr(reference, fn, counted(getattr(reference, fn), f"reference:{fn}"))
    return counts


def linear_and_input(seed: int = 0, in_features: int = 192, out_features: int = 48) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features), torch.randn(5, in_features)


# layer case -> (build from a Linear, the native op it should run or None, its reference function)
LAYER_CASES: dict[str, tuple[Callable[[nn.Linear], nn.Module], str | None, str]] = {
    "int8": (Int8WeightOnlyLinear.from_linear, "int8_linear", "int8_linear"),
    "int8-dynamic": (Int8DynamicLinear.from_linear, "int8_dynamic_linear", "int8_dynamic_linear"),
    "int8-mixed": (Int8MixedLinear.from_linear, "int8_dynamic_linear", "int8_dynamic_linear"),
    "int4-g64": (lambda lin: Int4WeightOnlyLinear.from_linear(lin, 64), "int4_linear", "int4_linear"),
    "int4-g96": (lambda lin: Int4WeightOnlyLinear.from_linear(lin, 96), None, "int4_linear"),  # not a kernel size
    "nf4": (NF4Linear.from_linear, "nf4_linear", "nf4_linear"),
    "fp8": (Fp8WeightOnlyLinear.from_linear, "fp8_linear", "fp8_linear"),
}


# ---- can_implement and the chooser ----------------------------------------------------


def int4_spec(**fields) -> LinearSpec:
    base = {"group_size": 64, "scale_dtype": torch.float16, "min_dtype": torch.float16}
    return LinearSpec(qk.INT4, 192, 48, **{**base, **fields})


def test_supported_specs_get_the_native_kernel(ops) -> None:
    native = f"quantserve-{ops.isa()}"
    assert choose_kernel(int4_spec()).name == native
    assert choose_kernel(int4_spec(group_size=32, act_dtype=torch.bfloat16)).name == native
    assert choose_kernel(LinearSpec(qk.INT8, 576, 1536, scale_dtype=torch.float32)).name == native
    assert choose_kernel(LinearSpec(qk.INT8_DYNAMIC, qk.INT8_DYNAMIC_MAX_K, 8)).name == native
    assert [k.name for k in qk.candidates(qk.INT4)] == [native, qk.REFERENCE]


def test_group_size_96_goes_to_the_reference_with_its_reason(ops, caplog: pytest.LogCaptureFixture) -> None:
    spec = int4_spec(group_size=96)
    native = qk.candidates(qk.INT4)[0]
    assert native.can_implement(spec) == "group_size 96 (kernels take 32, 64 or multiples of 128)"
    with caplog.at_level(logging.WARNING, logger="quant.kernels"):
        for _ in range(3):  # three layers of that shape: one line
            assert choose_kernel(spec).name == qk.REFERENCE
    skips = [r.getMessage() for r in caplog.records if "group_size 96" in r.getMessage()]
    assert len(skips) == 1 and native.name in skips[0], skips


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (int4_spec(scale_dtype=torch.float32), "scales/mins of dtype torch.float32/torch.float16 (kernels take float16)"),
        (int4_spec(min_dtype=torch.bfloat16), "scales/mins of dtype torch.float16/torch.bfloat16 (kernels take float16)"),
        (int4_spec(device="cuda"), "cuda tensors (the kernels are CPU only)"),
        (int4_spec(act_dtype=torch.float16), "torch.float16 activations"),
        (LinearSpec(qk.INT8, 64, 8, device="meta"), "meta tensors (the kernels are CPU only)"),
        (LinearSpec(qk.INT8_DYNAMIC, qk.INT8_DYNAMIC_MAX_K + 1, 8), "K = 65537 > 65536"),
        (LinearSpec(qk.NF4, 128, 8, group_size=64, scale_dtype=torch.float32), "absmax of dtype torch.float32 (the kernel takes float16)"),
        (LinearSpec(qk.FP8, 128, 8, act_dtype=torch.float16), "torch.float16 activations"),
    ],
)  # fmt: skip
def test_unsupported_specs_say_why(ops, spec: LinearSpec, reason: str) -> None:
    assert qk.candidates(spec.format)[0].can_implement(spec) == reason
    chosen = choose_kernel(spec)
    assert chosen.name == qk.REFERENCE and chosen.can_implement(spec) is None


def test_lookup_formats_have_native_kernels(ops) -> None:
    native = f"quantserve-{ops.isa()}"
    assert choose_kernel(LinearSpec(qk.NF4, 128, 8, group_size=64, scale_dtype=torch.float16)).name == native
    assert choose_kernel(LinearSpec(qk.FP8, 128, 8, scale_dtype=torch.float32)).name == native


def test_formats_without_native_kernels() -> None:
    assert choose_kernel(LinearSpec(qk.BNB, 128, 8)).name == "bitsandbytes"
    assert choose_kernel(LinearSpec(qk.BNB_INT8, 128, 8)).name == "bitsandbytes"
    with pytest.raises(ValueError, match="no kernels for storage format"):
        choose_kernel(LinearSpec("int3", 128, 8))


def test_a_new_format_registers_its_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    from quant.kernels import choose

    class SevensKernel(choose.LinearKernel):
        name = "sevens"
        format = "test-format"

        def can_implement(self, spec: LinearSpec) -> str | None:
            return None if spec.in_features % 7 == 0 else f"in_features {spec.in_features}"

    monkeypatch.setattr(choose, "CANDIDATES", dict(choose.CANDIDATES))  # the registration is undone after the test
    choose.register_format("test-format", (SevensKernel, choose.ReferenceInt8Kernel))
    choose.register_format("test-format", (SevensKernel, choose.ReferenceInt8Kernel))  # the same again: no-op
    assert choose_kernel(LinearSpec("test-format", 14, 1)).name == "sevens"
    assert choose_kernel(LinearSpec("test-format", 15, 1)).name == qk.REFERENCE
    with pytest.raises(ValueError, match="already has candidates"):
        choose.register_format("test-format", (choose.ReferenceInt8Kernel,))


def test_formats_without_native_kernels_do_not_load_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    import quant.kernels.build as build

    loads: list[int] = []
    monkeypatch.setattr(build, "load_library", lambda: loads.append(1))
    qk._NATIVE.reset()  # unresolved: the next native_ops() would load (here: count) the library
    try:
        assert choose_kernel(LinearSpec(qk.BNB, 128, 8)).name == "bitsandbytes"
        assert loads == []
    finally:
        qk._NATIVE.reset()


def test_configure_reference_is_chosen_without_warnings(ops, caplog: pytest.LogCaptureFixture) -> None:
    try:
        qk.configure(kernels="reference")
        native = qk.candidates(qk.INT8)[0]
        assert not native.enabled and "QS_KERNELS=reference" in native.can_implement(LinearSpec(qk.INT8, 64, 8))
        with caplog.at_level(logging.WARNING, logger="quant.kernels"):
            assert choose_kernel(int4_spec()).name == qk.REFERENCE
            assert choose_kernel(LinearSpec(qk.INT8, 64, 8)).name == qk.REFERENCE
        # an explicit choice, logged once at info by the loader: no warning per format
        assert not [r for r in caplog.records if r.name.startswith("quant.kernels")]
    finally:
        qk.configure()


# ---- layers: the kernel they name is the one their forward calls ------------------------


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_a_layer_runs_the_kernel_it_reports(case: str, ops, calls: Counter) -> None:
    build, native_op, reference_fn = LAYER_CASES[case]
    linear, x = linear_and_input()
    layer = build(linear)
    assert layer.kernel == (f"quantserve-{ops.isa()}" if native_op else qk.REFERENCE)
    calls.clear()  # quantizing may run the layer (none of these do, but only forward is counted)
    with torch.no_grad():
        y = layer(x)
    assert calls == Counter({f"quantserve:{native_op}" if native_op else f"reference:{reference_fn}": 1}), calls
    if native_op in ("int8_linear", "int4_linear"):  # they round activations to int8 blocks, the reference does not
        with torch.no_grad(), qk.use_reference():
            assert not torch.equal(layer(x), y)


def test_int8_mixed_with_outliers_runs_its_kernel_once(ops, calls: Counter) -> None:
    linear, x = linear_and_input(1)
    x[:, 3] = 20.0  # an outlier feature: the float path takes it, the W8A8 kernel the rest
    layer = Int8MixedLinear.from_linear(linear, threshold=6.0)
    calls.clear()
    layer(x)
    assert calls == Counter({"quantserve:int8_dynamic_linear": 1}), calls


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_configure_reference_layers_report_and_run_the_reference(case: str, ops, calls: Counter) -> None:
    build, _, reference_fn = LAYER_CASES[case]
    linear, x = linear_and_input(2)
    try:
        qk.configure(kernels="reference")
        layer = build(linear)
    finally:
        qk.configure()  # the native kernels are back for new layers; this one keeps its choice
    assert layer.kernel == qk.REFERENCE
    calls.clear()
    with torch.no_grad():
        layer(x)
    assert calls == Counter({f"reference:{reference_fn}": 1}), calls


def test_a_layer_keeps_its_kernel_when_the_options_change(ops, calls: Counter) -> None:
    linear, x = linear_and_input(3)
    layer = Int8WeightOnlyLinear.from_linear(linear)
    try:
        qk.configure(kernels="reference")
        calls.clear()
        layer(x)
        assert calls == Counter({"quantserve:int8_linear": 1}), calls  # chosen at quantize time, not per call
        assert layer.kernel == f"quantserve-{ops.isa()}"
    finally:
        qk.configure()


def test_each_isa_is_named_and_run(ops) -> None:
    linear, x = linear_and_input(4)
    try:
        for isa in ops.available_isas():
            qk.configure(isa=isa)
            layer = Int8WeightOnlyLinear.from_linear(linear)
            assert layer.kernel == f"quantserve-{isa}" and qk.native_ops().isa() == isa
            want = torch.ops.quantserve.int8_linear(x, layer.weight_int8, layer.scale, layer.bias)
            assert torch.equal(layer(x), want)
            report = quant.quantize_(nn.Sequential(nn.Linear(64, 32)), quant.make_config("int8"))
            assert report.kernels == {f"quantserve-{isa}": 1}
    finally:
        qk.configure()
    assert qk.native_ops().isa() == ops.available_isas()[0]  # auto: the best this CPU runs


def test_converting_the_storage_chooses_again(ops, calls: Counter) -> None:
    linear, x = linear_and_input(5)
    layer = Int4WeightOnlyLinear.from_linear(linear, 64)
    assert layer.kernel == f"quantserve-{ops.isa()}"
    layer.to(torch.bfloat16)  # float16 scales and mins become bfloat16: not what the kernel takes
    assert layer.scales.dtype == torch.bfloat16 and layer.act_dtype == torch.bfloat16
    assert layer.kernel == qk.REFERENCE
    calls.clear()
    y = layer(x.bfloat16())
    assert calls == Counter({"reference:int4_linear": 1}), calls
    weight = layer.dequantize_weight().bfloat16()  # what the reference multiplies by
    assert torch.equal(y, F.linear(x.bfloat16(), weight, layer.bias.bfloat16()))

    int8 = Int8WeightOnlyLinear.from_linear(linear).to(torch.bfloat16)  # bfloat16 activations: still native
    assert int8.kernel == f"quantserve-{ops.isa()}"
    calls.clear()
    int8(x.bfloat16())
    assert calls == Counter({"quantserve:int8_linear": 1}), calls


def test_per_call_checks_are_only_what_quantize_time_cannot_know(ops, calls, caplog) -> None:
    linear, x = linear_and_input(6)
    layer = Int8WeightOnlyLinear.from_linear(linear)
    needs_grad = x.clone().requires_grad_()
    with caplog.at_level(logging.WARNING, logger="quant.kernels"):
        for _ in range(2):
            layer(needs_grad).sum().backward()  # the reference path has a backward
            layer(x.half())  # activations of a dtype the kernels do not take
    assert calls == Counter({"reference:int8_linear": 4}), calls
    messages = [r.getMessage() for r in caplog.records]
    assert sum("inputs that require grad" in m for m in messages) == 1
    assert sum("torch.float16 activations" in m for m in messages) == 1
    assert layer.kernel == f"quantserve-{ops.isa()}"  # still the layer's kernel for ordinary inputs
    with torch.no_grad():
        layer(needs_grad)
    assert calls["quantserve:int8_linear"] == 1


def test_the_report_counts_what_the_model_runs(tiny_model_dir: Path, ops, calls: Counter) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4]])
    for mode, op in [("int8", "int8_linear"), ("int8-dynamic", "int8_dynamic_linear"), ("int4", "int4_linear")]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        # the head kept float: every quantized layer is then of `op`'s format
        options = quant.QuantOptions(group_size=32, quantize_lm_head=False)
        report = quant.quantize_(model, quant.make_config(mode, options))
        assert report.kernels == {f"quantserve-{ops.isa()}": report.layers_quantized} and report.layers_quantized
        calls.clear()
        with torch.no_grad():
            model(ids)
        assert calls == Counter({f"quantserve:{op}": report.layers_quantized}), (mode, calls)
        with torch.no_grad(), qk.use_reference():  # the A/B switch: same layers, reference path
            calls.clear()
            model(ids)
        assert calls == Counter({f"reference:{op}": report.layers_quantized}), (mode, calls)


def test_the_library_reads_no_environment(ops) -> None:
    """QS_KERNEL_ISA is read once, in Python; the C++ library starts on the best ISA until told otherwise."""
    if "avx2" not in ops.available_isas():
        pytest.skip("needs the avx2 kernels")
    code = (
        "import torch\n"
        "from quant.kernels.build import load_library\n"
        "load_library()\n"
        "ops = torch.ops.quantserve\n"
        "print(ops.isa(), ops.available_isas()[0])\n"
        "import quant.kernels as qk\n"
        "print(qk.native_ops().isa())\n"
    )
    env = clean_env(QS_KERNEL_ISA="avx2")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    library_isa, best, configured = done.stdout.split()
    assert library_isa == best  # the environment did not reach the C++ side
    assert configured == "avx2"  # quant.kernels read it and set it


def test_16bit_gemm_hardware_from_the_cpu_flags(monkeypatch) -> None:
    from quant.kernels import cpu

    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for flags, bf16, fp16 in (
        ({"avx2", "fma"}, False, False),  # Zen 3
        ({"avx2", "avx512f", "avx512_bf16"}, True, False),  # Zen 4
        ({"avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"}, True, True),  # Sapphire Rapids
    ):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert (cpu.has_fast_gemm(torch.bfloat16), cpu.has_fast_gemm(torch.float16)) == (bf16, fp16), flags
        assert cpu.has_fast_gemm(torch.float32)
    # oneDNN capped below its 16-bit GEMM levels (as a Zen 4 for float16, a Zen 3 for both)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert cpu.has_fast_gemm(torch.bfloat16) and not cpu.has_fast_gemm(torch.float16)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu.has_fast_gemm(torch.bfloat16)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert cpu.has_fast_gemm(torch.float16)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset())
    assert cpu.has_fast_gemm(torch.float16)  # unknown: trust torch
