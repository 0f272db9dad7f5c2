"""Pure tensor quantization primitives: no modules, no state.

Conventions
- Quantization acts along the last dimension. For a weight [out, in] that is
  the input dimension; for activations [tokens, features] it is per token.
- Granularity: `group_size=None` means one group per row (per output channel of
  a weight, per token of activations); `group_size=g` cuts every row into groups
  of g along the input dimension; `per_tensor=True` means one scale for the whole tensor.
- Scales come back shaped [..., n_groups, 1] so that they broadcast against the
  grouped view `x.reshape(*x.shape[:-1], n_groups, group_size)`.
- Every quantizer returns codes in that grouped view; pass `shape` to the
  matching dequantizer to get the original layout back.
"""

from __future__ import annotations

import functools

import torch

_EPS = 1e-12

# 4-bit NormalFloat (Dettmers et al., QLoRA 2023): the 16 quantiles of N(0, 1)
# rescaled to [-1, 1], with an exact zero. Values as published with bitsandbytes.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View `x` as [..., n_groups, group_size] along its last dimension."""
    k = x.shape[-1]
    g = k if group_size is None else group_size
    if k % g:
        raise ValueError(f"last dimension {k} is not a multiple of group size {g}")
    return x.reshape(*x.shape[:-1], k // g, g)


def _percentile(a: torch.Tensor, percentile: float, dim: int) -> torch.Tensor:
    """The `percentile`-th percentile along `dim` (keepdim). kthvalue, unlike torch.quantile, has no size limit."""
    n = a.shape[dim]
    k = min(n, max(1, round(percentile / 100.0 * n)))
    return a.kthvalue(k, dim=dim, keepdim=True).values


def _reduce(xg: torch.Tensor, per_tensor: bool, stat) -> torch.Tensor:
    """Apply `stat(tensor, dim)` per group, or over the whole tensor, keeping the grouped rank."""
    if per_tensor:
        return stat(xg.reshape(1, -1), -1).reshape([1] * xg.dim())
    return stat(xg, -1)


def _magnitude(xg: torch.Tensor, per_tensor: bool, clip_percentile: float | None) -> torch.Tensor:
    """|x| statistic that maps to the largest code: the max, or a percentile of |x| to clip outliers."""
    a = xg.abs().float()
    if clip_percentile is None:
        return _reduce(a, per_tensor, lambda t, d: t.amax(dim=d, keepdim=True))
    return _reduce(a, per_tensor, lambda t, d: _percentile(t, clip_percentile, d))


def quantize_symmetric(
    x: torch.Tensor,
    bits: int = 8,
    *,
    group_size: int | None = None,
    per_tensor: bool = False,
    clip_percentile: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization: q = round(x / s), s = max|x| / (2^(bits-1) - 1), codes in ±(2^(bits-1) - 1).

    `clip_percentile=99.9` uses that percentile of |x| instead of the max, so a
    few outliers saturate instead of stretching the step for everyone.
    Returns (q as int8 in the grouped view, scale float32 [..., n_groups, 1]).
    """
    qmax = 2 ** (bits - 1) - 1
    xg = grouped(x, group_size)
    scale = _magnitude(xg, per_tensor, clip_percentile).clamp_min(_EPS) / qmax
    q = torch.clamp(torch.round(xg.float() / scale), -qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
    x = q.float() * scale
    return x if shape is None else x.reshape(shape)


def affine_codes(xg: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes 0..2^bits-1 of grouped `xg` on the grid minimum + code * scale (given parameters)."""
    return torch.clamp(torch.round((xg.float() - minimum) / scale), 0, 2**bits - 1).to(torch.uint8)


def _affine_step(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    # A constant group has no range: any step represents it exactly. The floor
    # relative to |x| keeps zero = -lo / scale within float32's exact integers.
    floor = torch.maximum(lo.abs(), hi.abs()) * 2.0**-20
    return torch.maximum((hi - lo) / (2**bits - 1), floor).clamp_min(_EPS)


def affine_minmax_params(
    x: torch.Tensor, bits: int = 4, *, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of `quantize_affine`'s min-max grid per group, without computing the codes."""
    xg = grouped(x, group_size).float()
    lo, hi = xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)
    scale = _affine_step(lo, hi, bits)
    return scale, -lo / scale


def quantize_affine(
    x: torch.Tensor,
    bits: int = 4,
    *,
    group_size: int | None = None,
    per_tensor: bool = False,
    clip_percentile: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-point quantization to unsigned codes 0..2^bits-1: x ≈ (q - zero) * scale.

    `zero` is a float (not rounded) so that min and max of every group are
    representable exactly; the round-trip error is at most scale / 2.
    `clip_percentile=99.9` maps the 0.1th..99.9th percentiles to the code range
    (outliers saturate). Storage formats that keep a minimum instead of a zero
    point use min = -zero * scale.
    Returns (q uint8 grouped, scale [..., n_groups, 1], zero [..., n_groups, 1]).
    """
    xg = grouped(x, group_size).float()
    if clip_percentile is None:
        lo = _reduce(xg, per_tensor, lambda t, d: t.amin(dim=d, keepdim=True))
        hi = _reduce(xg, per_tensor, lambda t, d: t.amax(dim=d, keepdim=True))
    else:
        lo = _reduce(xg, per_tensor, lambda t, d: _percentile(t, 100.0 - clip_percentile, d))
        hi = _reduce(xg, per_tensor, lambda t, d: _percentile(t, clip_percentile, d))
    scale = _affine_step(lo, hi, bits)
    return affine_codes(xg, scale, lo, bits), scale, -lo / scale


def dequantize_affine(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size | None = None
) -> torch.Tensor:
    x = (q.float() - zero) * scale
    return x if shape is None else x.reshape(shape)


def optimize_affine_hqq(
    x: torch.Tensor,
    bits: int = 4,
    *,
    group_size: int | None = None,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half-quadratic quantization (Badri & Shaji, HQQ 2023): affine codes whose zero points
    minimise an l_p (p < 1) norm of the weight error, without calibration data.

    The l_p norm is sparsity-promoting: it lets a few outliers carry a large
    error so that the bulk of the group sits on the grid. Half-quadratic
    splitting alternates (1) a shrinkage of the error e = shrink_p(x - x̂) and
    (2) the closed-form zero that fits x - e; beta grows by kappa each step.
    The scale stays the min-max one (as in HQQ). Each group keeps the zero with
    the smallest mean |x - x̂| seen, so the result is never worse than min-max
    in that norm. Same return convention as `quantize_affine`.
    """
    _, scale, zero = quantize_affine(x, bits, group_size=group_size)
    # Work in units of the (fixed) step: e_s = x/scale - (q - zero), so that the zero
    # update is mean(q) - mean(x/scale) + mean(shrink(e) / scale).
    xs = grouped(x, group_size).float() / scale
    xs_mean = xs.mean(dim=-1, keepdim=True)
    eps = 1e-8 / scale  # HQQ's guard of |e|^(p-1) at e = 0, in step units
    shrink_factor = scale ** (lp_norm - 2)  # |e|^(p-1) / scale = |e_s|^(p-1) * scale^(p-2)
    qmax = 2**bits - 1
    best_zero = zero
    best_error = torch.full_like(zero, float("inf"))
    previous_total = float("inf")
    for _ in range(iters):
        q = (xs + zero).round_().clamp_(0, qmax)
        error = xs - q + zero
        magnitude = error.abs()
        mean_abs = magnitude.mean(dim=-1, keepdim=True)
        improved = mean_abs < best_error
        best_error = torch.where(improved, mean_abs, best_error)
        best_zero = torch.where(improved, zero, best_zero)
        total = (mean_abs * scale).mean().item()
        if total > previous_total * (1 - 1e-4):  # converged (HQQ stops when the error stops falling)
            break
        previous_total = total
        zero = q.mean(dim=-1, keepdim=True) - xs_mean
        # shrink_p(e) is 0 unless |e| > beta^(-1/(2-p)) in weight units (0.17 at the start): usually
        # no weight error is that large, and the costly pow is skipped without changing the result.
        if (magnitude * scale > 0.99 * beta ** (-1 / (2 - lp_norm))).any():
            shrunk = (magnitude - (magnitude + eps).pow_(lp_norm - 1).mul_(shrink_factor / beta)).relu_()
            zero += shrunk.mul_(error.sign()).mean(dim=-1, keepdim=True)
        beta *= kappa
    q = (xs + best_zero).round_().clamp_(0, qmax).to(torch.uint8)
    return q, scale, best_zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack codes 0..15 two per byte along the last dim: element 2i in the low nibble, 2i+1 in the high."""
    if q.shape[-1] % 2:
        raise ValueError("pack_int4 needs an even last dimension")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_nf4(x: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit NormalFloat: every block of `block_size` along the last dim is divided by its absmax
    and each value takes the index of the nearest of the 16 `NF4_CODE` levels.

    Returns (codes uint8 0..15 grouped, absmax float32 [..., n_blocks, 1]).
    """
    xg = grouped(x, block_size).float()
    absmax = xg.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS)
    code = torch.tensor(NF4_CODE, device=x.device)
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.bucketize(xg / absmax, midpoints).to(torch.uint8), absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
    code = torch.tensor(NF4_CODE, device=codes.device)
    x = code[codes.long()] * absmax.float()
    return x if shape is None else x.reshape(shape)


@functools.cache
def _nf4_byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2]: the NF4 levels of a packed byte's low and high nibble (built once per device)."""
    with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
        code = torch.tensor(NF4_CODE, device=device)
        return torch.stack((code.repeat(16), code.repeat_interleave(16)), dim=-1)


def dequantize_nf4_packed(packed: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, K] float32 from `pack_int4`-packed NF4 codes [N, K // 2] and absmax [N, K // block_size].

    One table lookup per byte (two levels at once) is several times faster than
    unpacking the nibbles and looking each up.
    """
    levels = torch.nn.functional.embedding(packed.int(), _nf4_byte_table(packed.device))
    n = packed.shape[0]
    return (levels.reshape(n, -1, block_size) * absmax.float()[..., None]).reshape(n, -1)


def quantize_fp8(x: torch.Tensor, fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """Float8 with one float32 scale per row: the row's absmax maps to the format's largest finite value.

    e4m3 (max 448, 3 mantissa bits) is the precise one for weights; e5m2 (max
    57344, 2 mantissa bits) trades precision for range.
    Returns (q float8 [..., K], scale float32 [..., 1]).
    """
    dtype = FP8_DTYPES[fmt]
    absmax = x.abs().float().amax(dim=-1, keepdim=True).clamp_min(_EPS)
    scale = absmax / torch.finfo(dtype).max
    return (x.float() / scale).to(dtype), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale
