"""GPTQ (Frantar et al., 2022) on int4's exact grid: asymmetric min-max per group, float16 scale and min.

For a linear with weight W [out, in] and calibration inputs X, GPTQ minimises ||W Xᵀ - Q Xᵀ||²
one input column at a time: after rounding column i, the error it made, scaled by the inverse
Hessian, is spread over the columns not yet rounded, so they compensate it. As in the reference
(IST-DASLab/gptq): H = 2/n Σ x xᵀ with 1% of its mean diagonal added (dampening), dead inputs
zeroed, the upper Cholesky factor of H⁻¹, columns in blocks of 128 with a lazy update of the rest
after each block. With act-order the columns go by decreasing diag(H) (the inputs that matter
most first, while many columns are left to compensate); "static groups" fixes every group's
scale and min from the weights before any update, so each group keeps one contiguous set of
parameters and the storage is int4's unchanged.

Group parameters are the ones `int4` itself would compute (`int4_group_params`: float16 scale and
min, codes on that stored grid), so the kernels and the native decode path serve the result as is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quant.layers.int4 import int4_dequantized, int4_group_params
from quant.layerwise import single_threaded

log = logging.getLogger(__name__)

BLOCK_SIZE = 128  # columns per lazy-update block, as the reference
DAMPENING = 0.01  # share of mean(diag H) added to the diagonal
_MAX_DAMPENING_TRIES = 6  # each retry multiplies the dampening by 10 (H not positive definite)


@dataclass
class Int4Solution:
    """GPTQ's result for one weight: codes [out, in], float16 scales and mins [out, n_groups]."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    dampening: float  # the relative dampening that made H⁻¹'s Cholesky factor exist

    def dequantized(self) -> torch.Tensor:
        return int4_dequantized(self.codes, self.scales.unsqueeze(-1), self.mins.unsqueeze(-1))


def _inverse_cholesky(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening·mean(diag H), raising λ tenfold until it exists."""
    mean_diagonal = hessian.diagonal().mean().item()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(_MAX_DAMPENING_TRIES):
        damped = hessian + eye * (dampening * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return upper, dampening
        dampening *= 10
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with dampening {dampening:g}")


def _codes(column: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """int4's code of each row's weight on that row's stored grid (as `affine_codes`)."""
    return torch.clamp(torch.round((column - minimum) / scale), 0, 15)


def gptq_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    *,
    act_order: bool = True,
    block_size: int = BLOCK_SIZE,
    dampening: float = DAMPENING,
) -> Int4Solution:
    """Quantize `weight` [out, in] to int4 codes + float16 group parameters with GPTQ, given H [in, in]."""
    with single_threaded():
        return _gptq_int4(weight, hessian, group_size, act_order, block_size, dampening)


def _gptq_int4(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, act_order: bool, block_size: int, dampening: float
) -> Int4Solution:
    out_features, in_features = weight.shape
    if in_features % group_size or block_size % group_size:
        raise ValueError(f"in_features {in_features} and block {block_size} must be multiples of group {group_size}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # an input that never fires: its weights do not matter, zero them
    w[:, dead] = 0.0
    n_groups = in_features // group_size
    scales = torch.empty(out_features, n_groups, dtype=torch.float16, device=w.device)
    mins = torch.empty_like(scales)
    if act_order:
        # static groups: every group's parameters from the weights before any update
        group_scales, group_mins = int4_group_params(w, group_size)
        scales.copy_(group_scales.squeeze(-1))
        mins.copy_(group_mins.squeeze(-1))
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        order = torch.arange(in_features, device=w.device)
    w = w[:, order]
    h = h[order][:, order]
    hinv, used_dampening = _inverse_cholesky(h, dampening)
    codes = torch.empty_like(w)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            column = order[start + i].item()
            group = column // group_size
            if not act_order and column % group_size == 0:
                # the group's parameters from its weights as updated so far (in this block: block % group == 0)
                group_scale, group_min = int4_group_params(block[:, i : i + group_size], group_size)
                scales[:, group] = group_scale.view(-1)
                mins[:, group] = group_min.view(-1)
            scale, minimum = scales[:, group].float(), mins[:, group].float()
            code = _codes(block[:, i], scale, minimum)
            codes[:, start + i] = code
            error = (block[:, i] - (code * scale + minimum)) / hinv_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    inverse_order = torch.argsort(order)
    return Int4Solution(codes[:, inverse_order].to(torch.uint8), scales, mins, used_dampening)
