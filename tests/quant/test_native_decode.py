"""The native decode step's kernels (`quantserve.NativeLinear`) and the int8 g32 (Q8_0-layout) layer.

Bounds, derived from the arithmetic as in test_kernels.py:
- packed kernels against the library's own ops on the same input: both quantize the
  activations identically and their integer sums are exact, so only float32 summation order
  differs: within 2·n·u·Σ|terms| (n = K/32 + 64, u = 2^-24), i.e. `float_bound`;
- fp8 reads float32 activations and exact weights: float32 GEMM rounding only (`gemm_bound`);
- nf4 rounds activations like int4 and looks each level up as coarse + fine / 254 int8 parts
  (qs_kernels.h): against the emulation x̂ · w it adds at most absmax / (2·254·127) per weight;
- int8 g32 against its emulation (activations quantized per 32-block, exact integer dots,
  one float multiply per block): the same float bound; against the float reference it adds
  the activation rounding, |x - x̂| <= s_b / 2 per element.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant.kernels as qk
from quant.kernels.choose import ReferenceInt8G32Kernel, nf4_code_table
from quant.kernels.native import use_reference
from quant.kernels.reference import dequantize_int8_g32
from quant.layers.int8_grouped import Int8G32Linear, quantize_int8_g32
from tests.quant.test_kernels import (  # the kernels' own emulation and bounds
    assert_within,
    block_quantized,
    float_bound,
    gemm_bound,
    nf4_weight,
    random_fp8,
    random_int4,
    random_int8,
    random_nf4,
)


def native_linear(kind: str, tensors: list[torch.Tensor], group_size: int = 0, bias=None, threads: int = 2):
    return torch.classes.quantserve.NativeLinear(kind, tensors, group_size, bias, threads)


def random_g32(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_int8_g32(torch.randn(n, k, generator=gen))


# N not a multiple of 16 (padded tiles), M across the kernels' row passes (AVX2: 2, AVX-512: 4)
SHAPES = [(1, 64, 300), (2, 576, 576), (3, 1536, 49), (5, 576, 192), (1, 96, 17)]


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_packed_int8_and_int4_match_the_ops(isa: str, m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 101 + k + n)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen)
    x_hat, _ = block_quantized(x)
    w, s = random_int8(n, k, gen)
    magnitude = x_hat.abs() @ (w.double().abs() * s.double()[:, None]).t() + bias.double().abs()
    got = native_linear("int8", [w, s], bias=bias).forward(x)
    assert_within(got, qk.int8_linear(x, w, s, bias).double(), 2 * float_bound(k, magnitude), "packed int8")
    # W8A8 dynamic: the same tiles, one activation scale per row (the op's codes, block sums in float)
    x_row = x.double().abs().amax(-1, keepdim=True)
    magnitude = (x.double().abs() + x_row / 127) @ (w.double().abs() * s.double()[:, None]).t() + bias.double().abs()
    got = native_linear("int8_row", [w, s], bias=bias).forward(x)
    want = qk.int8_dynamic_linear(x, w, s, bias).double()
    assert_within(got, want, 2 * float_bound(k, magnitude), "packed int8_row")
    for g in (32, 64) if k % 64 == 0 else (32,):
        packed, scales, mins = random_int4(n, k, g, gen)
        w4 = qk.dequantize_int4(packed, scales, mins, g).double()
        got = native_linear("int4", [packed, scales, mins], g, bias).forward(x)
        # the min term's float sums of x have magnitude |x|·|min| too
        magnitude = (x_hat.abs() + x.double().abs()) @ (w4.abs() + mins.double().abs().max()).t() + bias.double().abs()
        want = qk.int4_linear(x, packed, scales, mins, g, bias).double()
        assert_within(got, want, 2 * float_bound(k, magnitude), f"packed int4 g{g}")


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_packed_fp8_and_nf4_match_the_reference(isa: str, m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 103 + k + n)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen) if n % 2 else None
    b = 0 if bias is None else bias.double()
    for fmt in ("e4m3", "e5m2"):
        q, scale = random_fp8(n, k, fmt, gen)
        w = q.double() * scale.double()[:, None]
        got = native_linear(f"fp8_{fmt}", [q, scale], bias=bias).forward(x)
        assert_within(got, x.double() @ w.t() + b, gemm_bound(x, w, bias), f"packed fp8 {fmt}")
    x_hat, step = block_quantized(x)
    for block in (32, 64) if k % 64 == 0 else (32,):
        packed, absmax = random_nf4(n, k, block, gen)
        w = nf4_weight(packed, absmax, block)
        got = native_linear("nf4", [packed, absmax, nf4_code_table()], block, bias).forward(x)
        level_error = x_hat.abs() @ (absmax.double().repeat_interleave(block, dim=1) / (2 * 254 * 127)).t()
        rounding = 4 * float_bound(k, x_hat.abs() @ w.abs().t() + (0 if bias is None else bias.double().abs()))
        assert_within(got, x_hat @ w.t() + b, level_error + rounding, f"packed nf4 b{block} vs emulation")
        want = x.double() @ w.t() + b
        assert_within(got, want, (step / 2) @ w.abs().t() + level_error + rounding, f"packed nf4 b{block} vs reference")


@pytest.mark.parametrize(("kind", "dtype"), [("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_packed_float_weights_match_matmul(isa: str, m: int, k: int, n: int, kind: str, dtype: torch.dtype) -> None:
    """16-bit weights are widened exactly: the float32 matmul of the same values, summation order aside."""
    gen = torch.Generator().manual_seed(k + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen) if n % 2 else None
    want = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ w.double().abs().t() + (0 if bias is None else bias.double().abs())
    got = native_linear(kind, [w], bias=bias).forward(x)
    assert got.dtype == torch.float32
    assert_within(got, want, float_bound(k, magnitude), f"packed {kind}")
    # an error in the widening (a wrong byte, a lost subnormal) would be far above the bound
    assert_within(
        got,
        (x.double() @ w.float().double().t()) + (0 if bias is None else bias.double()),
        float_bound(k, magnitude),
        f"packed {kind} vs widened",
    )


def check_int8_g32(got: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias) -> None:
    w = dequantize_int8_g32(codes, scales).double()
    b = 0 if bias is None else bias.double()
    x_hat, step = block_quantized(x)
    rounding = float_bound(x.shape[-1], x_hat.abs() @ w.abs().t() + (0 if bias is None else bias.double().abs()))
    assert_within(got, x_hat @ w.t() + b, rounding, "int8_g32 vs emulation")
    assert_within(got, x.double() @ w.t() + b, (step / 2) @ w.abs().t() + rounding, "int8_g32 vs reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "k", "n"), [*SHAPES, (64, 576, 100), (257, 160, 33)])
def test_int8_g32_op(isa: str, m: int, k: int, n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m + 7 * k + n)
    codes, scales = random_g32(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen) if n % 2 else None
    got = torch.ops.quantserve.int8_g32_linear(x, codes, scales, bias)
    assert got.shape == (m, n) and got.dtype == dtype
    check_int8_g32(got, x, codes, scales, bias)
    if dtype == torch.float32:  # the decode step's packed kernel computes the same thing
        packed = native_linear("int8_g32", [codes, scales], bias=bias).forward(x)
        assert_within(packed, got.double(), 2 * float_bound(k, got.double().abs() + 1), "packed int8_g32")


def test_team_and_batch_do_not_change_results(ops) -> None:
    """Each output comes from one work item in a fixed order: threads and batch rows change nothing."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 576, generator=gen)
    packed, scales, mins = random_int4(1536, 576, 64, gen)
    nf4 = [*random_nf4(200, 576, 64, gen), nf4_code_table()]
    cases = [
        ("int4", [packed, scales, mins], 64),
        ("int8_g32", list(random_g32(300, 576, gen)), 0),
        ("nf4", nf4, 64),
        ("fp8_e4m3", list(random_fp8(100, 576, "e4m3", gen)), 0),
    ]
    for kind, tensors, g in cases:
        one = native_linear(kind, tensors, g, threads=1).forward(x)
        two = native_linear(kind, tensors, g, threads=2).forward(x)
        rows = torch.cat([native_linear(kind, tensors, g, threads=2).forward(x[i : i + 1]) for i in range(5)])
        assert torch.equal(one, two) and torch.equal(one, rows)


def test_bench_runs_back_to_back_copies(ops) -> None:
    gen = torch.Generator().manual_seed(6)
    linear = native_linear("int8_g32", list(random_g32(64, 64, gen)))
    assert linear.bench(torch.randn(1, 64), 10, 3) > 0
    assert linear.weight_bytes() == 4 * (64 + 16 * 64)  # 4 tiles: 2 x 16 fp16 scales (64 B) + 16 x 64 codes


def test_native_linear_rejects_bad_weights(ops) -> None:
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native_linear("int8", [torch.zeros(4, 40, dtype=torch.int8), torch.ones(4)])
    with pytest.raises(RuntimeError, match="unknown linear kind"):
        native_linear("int3", [torch.zeros(4, 64)])


# ---- the layer ---------------------------------------------------------------------------


def test_quantize_int8_g32_grid() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=gen)
    w[3, :32] = 0  # an all-zero block keeps scale 0
    codes, scales = quantize_int8_g32(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (40, 3)
    assert codes.abs().max() <= 127 and scales[3, 0] == 0 and (codes[3, :32] == 0).all()
    # every weight lies within half a step of its code, on the stored float16 scale
    err = (dequantize_int8_g32(codes, scales) - w).abs().reshape(40, 3, 32)
    assert (err <= scales.float()[..., None] / 2 + 1e-7).all()
    # a weight already on such a grid comes back unchanged
    again = quantize_int8_g32(dequantize_int8_g32(codes, scales))
    assert torch.equal(again[0], codes) and torch.equal(again[1], scales)


def test_int8_g32_layer(ops) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 50)
    layer = Int8G32Linear.from_linear(linear)
    assert layer.kernel == f"quantserve-{ops.isa()}"
    x = torch.randn(3, 7, 96)
    check_int8_g32(layer(x).reshape(-1, 50), x.reshape(-1, 96), layer.weight_int8, layer.scales, layer.bias)
    with use_reference():
        reference = layer(x)
    torch.testing.assert_close(reference, F.linear(x, layer.dequantize_weight(), layer.bias))
    rows = layer.embedding_rows(torch.tensor([[3, 0], [49, 3]]))
    assert torch.equal(rows, layer.dequantize_weight()[torch.tensor([[3, 0], [49, 3]])])
    with pytest.raises(ValueError, match="multiple of 32"):
        Int8G32Linear(100, 4)


def test_int8_g32_layer_on_reference_path_when_kernels_are_off(monkeypatch) -> None:
    qk.configure(kernels="reference")
    layer = Int8G32Linear.from_linear(nn.Linear(64, 8))
    assert isinstance(layer.linear_kernel, ReferenceInt8G32Kernel) and layer.kernel == "reference"
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize_weight(), layer.bias))


@pytest.mark.real_model
def test_int8_g32_reproduces_the_gguf_q8_0_embedding(default_checkpoint) -> None:
    """The default model's GGUF stores token_embd as Q8_0: the layer gets back its exact codes and scales."""
    from gguf import GGUFReader
    from safetensors import safe_open

    from quant.checkpoints import embedded_gguf

    tensor = next(t for t in GGUFReader(embedded_gguf()).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type.name == "Q8_0"
    blocks = np.asarray(tensor.data).reshape(-1, 34)  # Q8_0 block: fp16 scale, then 32 int8 codes
    gguf_scales = torch.from_numpy(blocks[:, :2].copy().view(np.float16)).reshape(tensor.data.shape[0], -1)
    gguf_codes = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).reshape(tensor.data.shape[0], -1)
    with safe_open(default_checkpoint / "model.safetensors", "pt") as f:
        weight = f.get_tensor("model.embed_tokens.weight").float()
    codes, scales = quantize_int8_g32(weight)
    assert codes.shape == gguf_codes.shape == (49152, 576)
    assert torch.equal(scales, gguf_scales)
    assert torch.equal(codes, gguf_codes)
