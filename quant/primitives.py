"""Pure tensor quantization primitives: no modules, no state.

Conventions
- Quantization acts along the last dimension. For a weight [out, in] that is
  the input dimension; for activations [tokens, features] it is per token.
- `group_size=None` means one group per row (per output channel / per token);
  `per_tensor=True` means one scale for the whole tensor.
- Scales come back shaped [..., n_groups, 1] so that they broadcast against the
  grouped view `x.reshape(*x.shape[:-1], n_groups, group_size)`.
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View `x` as [..., n_groups, group_size] along its last dimension."""
    k = x.shape[-1]
    g = k if group_size is None else group_size
    if k % g:
        raise ValueError(f"last dimension {k} is not a multiple of group size {g}")
    return x.reshape(*x.shape[:-1], k // g, g)


def _magnitude(xg: torch.Tensor, per_tensor: bool, clip_percentile: float | None) -> torch.Tensor:
    """|x| statistic that maps to the largest code: the max, or a percentile of |x| to clip outliers."""
    a = xg.abs().float()
    if per_tensor:
        a = a.reshape(1, -1)
        stat = a.amax(dim=-1) if clip_percentile is None else torch.quantile(a, clip_percentile / 100.0, dim=-1)
        return stat.reshape([1] * xg.dim())
    if clip_percentile is None:
        return a.amax(dim=-1, keepdim=True)
    return torch.quantile(a, clip_percentile / 100.0, dim=-1, keepdim=True)


def quantize_symmetric(
    x: torch.Tensor,
    bits: int = 8,
    *,
    group_size: int | None = None,
    per_tensor: bool = False,
    clip_percentile: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization: q = round(x / s), s = max|x| / (2^(bits-1) - 1).

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


def quantize_affine(
    x: torch.Tensor,
    bits: int = 4,
    *,
    group_size: int | None = None,
    per_tensor: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-point quantization to unsigned codes 0..2^bits-1: x ≈ (q - zero) * scale.

    `zero` is a float (not rounded) so that min and max of every group are
    representable exactly; the round-trip error is at most scale / 2.
    Returns (q uint8 grouped, scale [..., n_groups, 1], zero [..., n_groups, 1]).
    """
    qmax = 2**bits - 1
    xg = grouped(x, group_size).float()
    if per_tensor:
        lo = xg.amin().reshape([1] * xg.dim())
        hi = xg.amax().reshape([1] * xg.dim())
    else:
        lo = xg.amin(dim=-1, keepdim=True)
        hi = xg.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(_EPS)
    zero = -lo / scale
    q = torch.clamp(torch.round(xg / scale + zero), 0, qmax).to(torch.uint8)
    return q, scale, zero


def dequantize_affine(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size | None = None
) -> torch.Tensor:
    x = (q.float() - zero) * scale
    return x if shape is None else x.reshape(shape)


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
