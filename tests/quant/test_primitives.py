"""Quantization primitives: the worked example from the literature and hypothesis properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.primitives import (
    FP8_DTYPES,
    NF4_CODE,
    dequantize_affine,
    dequantize_fp8,
    dequantize_nf4,
    dequantize_nf4_packed,
    dequantize_symmetric,
    grouped,
    optimize_affine_hqq,
    pack_int4,
    quantize_affine,
    quantize_fp8,
    quantize_nf4,
    quantize_symmetric,
    unpack_int4,
)

# Rows of 8..256 finite floats with a wide dynamic range (including exact zeros and repeats).
finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
group_sizes = st.sampled_from([None, 2, 4, 8])


def rows(min_cols: int = 8) -> st.SearchStrategy[torch.Tensor]:
    return st.integers(1, 4).flatmap(
        lambda n: st.integers(1, 4).flatmap(
            lambda k: st.lists(finite, min_size=n * k * min_cols, max_size=n * k * min_cols).map(
                lambda v: torch.tensor(v).reshape(n, k * min_cols)
            )
        )
    )


def test_absmax_int8_worked_example() -> None:
    x = torch.tensor([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2])
    q, scale = quantize_symmetric(x, bits=8, per_tensor=True)
    assert q.flatten().tolist() == [33, -14, -70, 35, -59, 10, 47, 127]
    assert 1 / scale.item() == pytest.approx(127 / 6.2)


@given(x=rows(), group_size=group_sizes, bits=st.sampled_from([4, 8]))
def test_symmetric_round_trip_within_half_step(x: torch.Tensor, group_size: int | None, bits: int) -> None:
    q, scale = quantize_symmetric(x, bits, group_size=group_size)
    assert q.abs().max() <= 2 ** (bits - 1) - 1
    error = (dequantize_symmetric(q, scale, x.shape) - x).abs()
    step = scale.expand(*grouped(x, group_size).shape).reshape(x.shape)
    assert (error <= step / 2 + 1e-6 * x.abs() + 1e-30).all()


@given(x=rows(), group_size=group_sizes, bits=st.sampled_from([4, 8]))
def test_zero_point_round_trip_within_half_step(x: torch.Tensor, group_size: int | None, bits: int) -> None:
    q, scale, zero = quantize_affine(x, bits, group_size=group_size)
    assert int(q.max()) <= 2**bits - 1
    error = (dequantize_affine(q, scale, zero, x.shape) - x).abs()
    step = scale.expand(*grouped(x, group_size).shape).reshape(x.shape)
    # float32 evaluates (q - zero) * scale with a rounding of order 1e-6 of the group's magnitude
    slack = 1e-5 * grouped(x, group_size).abs().amax(-1, keepdim=True).expand_as(grouped(x, group_size))
    assert (error <= step / 2 + slack.reshape(x.shape) + 1e-30).all()


@given(x=rows())
def test_per_tensor_zero_point_within_half_step(x: torch.Tensor) -> None:
    q, scale, zero = quantize_affine(x, 8, per_tensor=True)
    assert scale.numel() == 1
    error = (dequantize_affine(q, scale, zero, x.shape) - x).abs()
    assert (error <= scale / 2 + 1e-5 * x.abs().max() + 1e-30).all()


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    outlier=st.floats(10.0, 1000.0),
    group_size=st.sampled_from([32, 64, 128]),
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
)
def test_per_group_error_below_per_tensor_with_an_outlier(
    seed: int, outlier: float, group_size: int, bits: int, symmetric: bool
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 256, generator=generator)
    x[seed % 8, seed % 256] = outlier  # one large value, as in LLM weights and activations

    def mse(**granularity) -> float:
        if symmetric:
            q, scale = quantize_symmetric(x, bits, **granularity)
            approx = dequantize_symmetric(q, scale, x.shape)
        else:
            q, scale, zero = quantize_affine(x, bits, **granularity)
            approx = dequantize_affine(q, scale, zero, x.shape)
        return (approx - x).pow(2).mean().item()

    assert mse(group_size=group_size) <= mse(per_tensor=True)


def test_percentile_clipping_trades_the_outlier_for_the_bulk() -> None:
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
    x[0, 7] = 200.0
    q, scale = quantize_symmetric(x, 8, clip_percentile=99.9)
    approx = dequantize_symmetric(q, scale, x.shape)
    q_max, scale_max = quantize_symmetric(x, 8)
    approx_max = dequantize_symmetric(q_max, scale_max, x.shape)
    bulk = torch.ones_like(x, dtype=torch.bool)
    bulk[0, 7] = False
    assert (approx - x)[bulk].abs().mean() < (approx_max - x)[bulk].abs().mean() / 10
    assert approx[0, 7] < 10  # the outlier saturates


@given(codes=st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_is_identity(codes: list[int]) -> None:
    q = torch.tensor(codes, dtype=torch.uint8).reshape(1, -1)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == q.shape[-1] // 2
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)  # even element in the low nibble


@settings(deadline=None)
@given(seed=st.integers(0, 2**31 - 1), group_size=st.sampled_from([32, 64]))
def test_hqq_never_worse_than_min_max_in_its_norm(seed: int, group_size: int) -> None:
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(seed)) * 0.02
    q, scale, zero = quantize_affine(x, 4, group_size=group_size)
    q_h, scale_h, zero_h = optimize_affine_hqq(x, 4, group_size=group_size)
    error = (dequantize_affine(q, scale, zero, x.shape) - x).abs()
    error_h = (dequantize_affine(q_h, scale_h, zero_h, x.shape) - x).abs()
    per_group = grouped(error, group_size).mean(-1)
    per_group_h = grouped(error_h, group_size).mean(-1)
    assert (per_group_h <= per_group * (1 + 1e-5)).all()
    assert torch.equal(scale_h, scale)  # HQQ optimises the zero point only


def test_nf4_code_matches_bitsandbytes() -> None:
    functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    assert torch.allclose(torch.tensor(NF4_CODE), functional.get_4bit_type("nf4", device="cpu"))


@given(x=rows(min_cols=64))
def test_nf4_picks_the_nearest_level(x: torch.Tensor) -> None:
    codes, absmax = quantize_nf4(x, 64)
    approx = dequantize_nf4(codes, absmax, x.shape)
    levels = torch.tensor(NF4_CODE)[None, None, None, :] * absmax[..., None]
    best = (grouped(x, 64)[..., None] - levels).abs().amin(-1).reshape(x.shape)
    assert torch.allclose((approx - x).abs(), best, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize(("fmt", "bound"), [("e4m3", 2**-4), ("e5m2", 2**-3)])
def test_fp8_relative_error_within_half_ulp(fmt: str, bound: float) -> None:
    # Values within the normal range of the scaled format round to the nearest of 2^m steps per octave.
    x = torch.linspace(0.05, 1.0, 1000).reshape(4, 250) * torch.tensor([[1.0], [-3.0], [1e-3], [1e3]])
    q, scale = quantize_fp8(x, fmt)
    assert q.dtype == FP8_DTYPES[fmt]
    relative = ((dequantize_fp8(q, scale) - x).abs() / x.abs()).max().item()
    assert relative <= bound


@given(codes=st.lists(st.integers(0, 15), min_size=128, max_size=128), seed=st.integers(0, 100))
def test_packed_nf4_dequantization_matches_the_codes(codes: list[int], seed: int) -> None:
    q = torch.tensor(codes, dtype=torch.uint8).reshape(2, 64)
    absmax = torch.rand(2, 1, generator=torch.Generator().manual_seed(seed)).half()
    expected = dequantize_nf4(q.reshape(2, 1, 64), absmax[..., None], q.shape)
    assert torch.equal(dequantize_nf4_packed(pack_int4(q), absmax, 64), expected)
