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

Group parameters live on `int4`'s stored grid (float16 scale and min, codes 0..15 on that grid), so
the kernels and the native decode path serve the result as is. Two steps around the column loop
choose them better than min-max (both optional; `int4-gptq` uses both):
- before it, `search_group_params`: per group, the range [min, max] pulled in from either end (a
  clip, 8 x 8 candidates), scored by that group's output error eᵀ B e, B its diagonal block of H
  (the reference's `Quantizer(mse=True)` scores plain weight MSE instead);
- after it, `refit_group_params`: given GPTQ's codes, the scales and mins that minimise the layer's
  output error tr(E H Eᵀ) exactly (least squares, 2 parameters per group and row), optionally with
  GPTQ re-run on the refitted grid (`refit_rounds` > 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quant.layers.int4 import int4_codes, int4_dequantized, int4_group_params
from quant.layerwise import single_threaded
from quant.primitives import grouped

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


def diagonal_blocks(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """H's diagonal blocks, one per group of inputs: [n_groups, group_size, group_size]."""
    n_groups = hessian.shape[0] // group_size
    blocks = hessian.reshape(n_groups, group_size, n_groups, group_size)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def group_output_error(error: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """eᵀ B e per row and group [out, n_groups]: the error's share of the output error, its group alone."""
    per_group = error.transpose(0, 1)  # [n_groups, out, group_size]
    return (torch.bmm(per_group, blocks) * per_group).sum(-1).transpose(0, 1)


def search_group_params(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, shrink_steps: int = 8, shrink_step: float = 0.025
) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 scales and mins [out, n_groups] whose round-to-nearest output error is smallest per group.

    Candidates pull the group's min up and its max down independently, by 0, 1, ... shrink_steps - 1
    steps of `shrink_step` x its range (clipping outliers buys the other weights a finer grid); each is
    scored as GPTQ's objective would score that group alone: eᵀ B e with B the group's diagonal block of H."""
    blocks = diagonal_blocks(hessian, group_size)
    wg = grouped(weight.float(), group_size)
    lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    span = hi - lo
    best_error = torch.full(lo.shape[:-1], float("inf"), device=weight.device)
    best_scales, best_mins = int4_group_params(weight, group_size)
    for low_step in range(shrink_steps):
        for high_step in range(shrink_steps):
            low = lo + span * (low_step * shrink_step)
            high = hi - span * (high_step * shrink_step)
            scales = ((high - low) / 15).clamp_min(2.0**-24).to(torch.float16)
            mins = low.to(torch.float16)
            error = wg - grouped(int4_dequantized(int4_codes(weight, scales, mins), scales, mins), group_size)
            total = group_output_error(error, blocks)
            better = total < best_error
            best_error = torch.where(better, total, best_error)
            best_scales = torch.where(better.unsqueeze(-1), scales, best_scales)
            best_mins = torch.where(better.unsqueeze(-1), mins, best_mins)
    return best_scales.squeeze(-1), best_mins.squeeze(-1)


def refit_group_params(
    weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given the codes, the float16 scales and mins [out, n_groups] that minimise the layer's output error
    tr((W - Ŵ) H (W - Ŵ)ᵀ) exactly: per row a least-squares problem in its 2·n_groups parameters, since
    Ŵ[r, j] = scale[r, g(j)] · code[r, j] + min[r, g(j)] is linear in them."""
    out_features, in_features = weight.shape
    n_groups = in_features // group_size
    q = codes.float().reshape(out_features, n_groups, group_size)
    h = hessian.reshape(in_features, n_groups, group_size)
    # k[r, i, g] = Σ_{j in g} H[i, j] q[r, j]
    k = torch.einsum("igj,rgj->rig", h, q).reshape(out_features, n_groups, group_size, n_groups)
    scale_scale = torch.einsum("rgi,rgih->rgh", q, k)  # Σ_{i in g, j in h} q_i H_ij q_j
    min_scale = k.sum(2)  # [r, g, h] = Σ_{i in g, j in h} H_ij q_j
    min_min = hessian.reshape(n_groups, group_size, n_groups, group_size).sum((1, 3))
    hw = (weight.float() @ hessian).reshape(out_features, n_groups, group_size)
    rhs = torch.cat([(q * hw).sum(-1), hw.sum(-1)], dim=1)
    system = torch.cat(
        [
            torch.cat([scale_scale, min_scale.transpose(1, 2)], dim=2),
            torch.cat([min_scale, min_min.expand(out_features, -1, -1)], dim=2),
        ],
        dim=1,
    )
    # solved in float64 (H's large channels make it ill-conditioned), with a tiny ridge: a group whose
    # codes are all equal has no scale to fit
    system, rhs = system.double(), rhs.double()
    ridge = system.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30) * 1e-9
    system = system + torch.eye(2 * n_groups, dtype=system.dtype, device=system.device) * ridge[:, None, None]
    solution = torch.linalg.solve(system, rhs)
    scales = solution[:, :n_groups]
    # a scale too small for float16 would make every later code a division by zero
    scales = torch.where(scales.abs() < 2.0**-24, torch.full_like(scales, 2.0**-24), scales)
    return scales.to(torch.float16), solution[:, n_groups:].to(torch.float16)


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
    search_params: bool = False,
    refit_rounds: int = 0,
) -> Int4Solution:
    """Quantize `weight` [out, in] to int4 codes + float16 group parameters with GPTQ, given H [in, in]."""
    with single_threaded():
        return _gptq_int4(weight, hessian, group_size, act_order, block_size, dampening, search_params, refit_rounds)


def _gptq_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    act_order: bool,
    block_size: int,
    dampening: float,
    search_params: bool,
    refit_rounds: int,
) -> Int4Solution:
    in_features = weight.shape[1]
    if in_features % group_size or block_size % group_size:
        raise ValueError(f"in_features {in_features} and block {block_size} must be multiples of group {group_size}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # an input that never fires: its weights do not matter, zero them
    w[:, dead] = 0.0
    if search_params:
        scales, mins = search_group_params(w, h, group_size)
    else:
        group_scales, group_mins = int4_group_params(w, group_size)
        scales, mins = group_scales.squeeze(-1), group_mins.squeeze(-1)
    order = (
        torch.argsort(h.diagonal(), descending=True, stable=True)
        if act_order
        else torch.arange(in_features, device=w.device)
    )
    hinv, used_dampening = _inverse_cholesky(h[order][:, order], dampening)
    codes = _gptq_codes(
        w, hinv, order, scales, mins, group_size, block_size, dynamic=not act_order and not search_params
    )
    for round_index in range(refit_rounds):
        if round_index:  # GPTQ again, on the refitted grid
            codes = _gptq_codes(w, hinv, order, scales, mins, group_size, block_size, dynamic=False)
        scales, mins = refit_group_params(w, h, codes, group_size)
    return Int4Solution(codes.to(torch.uint8), scales, mins, used_dampening)


def _gptq_codes(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    order: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    block_size: int,
    dynamic: bool,
) -> torch.Tensor:
    """GPTQ's column loop over `order`; `dynamic` (natural order only) sets each group's parameters from its
    weights as updated so far, writing them into `scales` and `mins`; otherwise they are fixed."""
    in_features = weight.shape[1]
    w = weight[:, order].clone()
    codes = torch.empty_like(w)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            column = order[start + i].item()
            group = column // group_size
            if dynamic and column % group_size == 0:
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
    return codes[:, torch.argsort(order)]
