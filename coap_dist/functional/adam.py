"""Moment updates of COAP-AdamW and COAP-Adafactor on low-rank (or dense) tensors.

All functions update moment tensors in place and return the normalized direction D that the
caller back-projects. Shapes are those of the projected gradient R (a x r for a matrix, the
Tucker core for a convolution, the parameter itself for dense AdamW).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def adam_step_size(lr: float, beta1: float, beta2: float, t: int) -> float:
    """lr * sqrt(1 - b2^t) / (1 - b1^t): Adam's bias correction folded into the step size."""
    return lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def adam_directions(
    ms: list[Tensor], vs: list[Tensor], rs: list[Tensor], beta1: float, beta2: float, eps: float
) -> list[Tensor]:
    """Batched over tensors (torch._foreach):

    M <- b1 M + (1 - b1) R;   V <- b2 V + (1 - b2) R^2;   D = M / (sqrt(V) + eps)
    """
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, rs, alpha=1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, rs, rs, value=1.0 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_add_(denom, eps)
    return list(torch._foreach_div(ms, denom))


def adafactor_beta2(t: int, decay_rate: float = -0.8) -> float:
    """Adafactor's increasing second-moment decay: beta2_t = 1 - t^decay_rate."""
    return 1.0 - math.pow(t, decay_rate)


def adafactor_row_stats(r: Tensor, v_row: Tensor, *, beta2t: float, eps1: float) -> Tensor:
    """First Adafactor phase on this member's rows of R (a_t x c), v_row updated in place:

        v_row <- b2t v_row + (1 - b2t) mean_j(R^2 + eps1)          (a_t,)

    Returns the partial sums [sum_i (R^2 + eps1) (c,), sum_i v_row (1,)] that the column
    statistics and the row normaliser need over ALL rows of the matrix.
    """
    sq = r.float().square().add_(eps1)
    v_row.mul_(beta2t).add_(sq.mean(dim=1), alpha=1.0 - beta2t)
    return torch.cat([sq.sum(dim=0), v_row.sum().reshape(1)])


def adafactor_scaled(
    r: Tensor, v_row: Tensor, v_col: Tensor, sums: Tensor, *, beta2t: float, global_rows: int
) -> tuple[Tensor, Tensor]:
    """Second phase, from the summed :func:`adafactor_row_stats` (v_col updated in place):

        v_col <- b2t v_col + (1 - b2t) mean_i(R^2 + eps1)          (c,)
        U = R / sqrt(v_row v_col^T / mean_i(v_row))

    Returns (U (a_t x c), partial sum of U^2 (1,)) for the global RMS.
    """
    col_sum, row_sum = sums[:-1], sums[-1:]
    v_col.mul_(beta2t).add_(col_sum / global_rows, alpha=1.0 - beta2t)
    r_factor = (v_row / (row_sum / global_rows)).rsqrt_().unsqueeze(1)
    c_factor = v_col.rsqrt().unsqueeze(0)
    u = r.float() * r_factor * c_factor
    return u, u.square().sum().reshape(1)


def adafactor_finish(
    u: Tensor,
    m: Tensor,
    sq_sum: Tensor,
    *,
    beta1: float,
    clip_threshold: float,
    global_rows: int,
) -> Tensor:
    """Last phase, from the summed U^2 over all rows (m updated in place; returns D = M):

    U <- U / max(1, RMS(U) / clip_threshold);   M <- b1 M + (1 - b1) U
    """
    rms = (sq_sum / (global_rows * u.shape[1])).sqrt()
    u.div_((rms / clip_threshold).clamp_(min=1.0))
    m.mul_(beta1).add_(u.to(m.dtype), alpha=1.0 - beta1)
    return m


def adafactor_direction(
    r: Tensor,
    m: Tensor,
    v_row: Tensor,
    v_col: Tensor,
    *,
    beta1: float,
    beta2t: float,
    eps1: float = 1e-30,
    clip_threshold: float = 1.0,
) -> Tensor:
    """Adafactor (factored second moment) on a whole projected gradient R (a x c), in place:
    the three phases above with nothing to sum (one process or a whole-owned matrix)."""
    rows = r.shape[0]
    sums = adafactor_row_stats(r, v_row, beta2t=beta2t, eps1=eps1)
    u, sq = adafactor_scaled(r, v_row, v_col, sums, beta2t=beta2t, global_rows=rows)
    return adafactor_finish(u, m, sq, beta1=beta1, clip_threshold=clip_threshold, global_rows=rows)
